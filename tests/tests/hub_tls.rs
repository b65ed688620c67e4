//! The hub over a TLS listener: it trusts the broker's CA from `[mqtt.tls] ca_file`, and with
//! mutual TLS presents its client certificate; an app gets an access token through it.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Result, bail};
use tessera_hub::client::{Answer, Client};
use tessera_hub::mqtt::TlsConfig;
use tessera_shared::message::RequestBody;
use tessera_shared::scope::Scopes;
use tessera_shared::token::{self, Validation};
use tessera_tests::hub::{TestHub, Transport, unix_now};

const WAIT: Duration = Duration::from_secs(5);

async fn access_token_round_trip(hub: &TestHub) -> Result<()> {
    hub.dir()
        .add_device("tls-door", "sensor", &["building-a"])?;
    let key = hub.dir().add_app("tls-app", "controller")?;
    let mut app = hub.client("tls-app", &key).await?;
    let answer = app
        .request(
            RequestBody::AccessToken {
                device: "tls-door",
                scope: Scopes::parse("door:open").unwrap(),
            },
            WAIT,
        )
        .await?;
    app.close().await;
    let Answer::Token { token, .. } = answer else {
        bail!("expected a token, got {answer:?}")
    };
    let validation = Validation::new(unix_now(), "tls-door")
        .with_issuer(hub.dir().hub_id())
        .with_scope("door:open");
    let verified = token::verify(&token, &hub.trust_anchor(), &validation)
        .map_err(|e| anyhow::anyhow!("token: {e}"))?;
    assert_eq!(verified.claims().sub, "tls-app");
    assert_eq!(verified.claims().cnf, key.public_key()?);
    Ok(())
}

#[tokio::test]
async fn over_tls_the_hub_trusts_the_broker_ca_and_issues_an_access_token() -> Result<()> {
    let hub = TestHub::builder().transport(Transport::Tls).start().await?;
    assert!(hub.broker().url().starts_with("mqtts://"));
    access_token_round_trip(&hub).await
}

#[tokio::test]
async fn over_mutual_tls_the_hub_presents_its_client_certificate_and_issues_an_access_token()
-> Result<()> {
    let hub = TestHub::builder()
        .transport(Transport::MutualTls)
        .start()
        .await?;
    access_token_round_trip(&hub).await?;

    // The broker does require the certificate: without one a client cannot even connect.
    let mut without = hub.mqtt("tls-no-cert");
    without.tls = Some(TlsConfig {
        client_cert_file: None,
        client_key_file: None,
        ..without.tls.clone().unwrap()
    });
    let key = hub.dir().add_app("tls-no-cert", "controller")?;
    let refused = Client::connect(
        &without,
        "tls-no-cert",
        key.signer()?,
        hub.trust_anchor(),
        Duration::from_secs(2),
    )
    .await;
    assert!(refused.is_err(), "connected without a client certificate");
    Ok(())
}
