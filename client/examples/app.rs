//! A control app in about 30 lines: gets an access token for a device from the hub and
//! prints a presentation of it (hex) for the device, e.g. for
//! `tessera-agent verify --scope door:open HEX`.
//!
//! ```text
//! cargo run -p tessera-client --example app -- HOST:PORT APP_ID APP_KEY.pem TRUST_ANCHOR DEVICE [SCOPE]
//! ```
//!
//! TRUST_ANCHOR is the hub's `trust-anchor.pem` or the COSE_Key hex `tessera-hub init`
//! printed.

use std::time::Duration;

use tessera_client::{Client, MqttConfig, keyfile};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [broker, app, key, anchor, device, rest @ ..] = args.as_slice() else {
        return Err("usage: app HOST:PORT APP_ID APP_KEY.pem TRUST_ANCHOR DEVICE [SCOPE]".into());
    };
    let scope = rest.first().map_or("door:open", String::as_str);
    let (host, port) = broker.rsplit_once(':').ok_or("the broker is HOST:PORT")?;
    let anchor = std::fs::read_to_string(anchor).unwrap_or_else(|_| anchor.clone());
    let mut client = Client::connect(
        &MqttConfig::plain(host, port.parse()?, app),
        app,
        keyfile::read_private(key.as_ref())?,
        keyfile::anchor_from_text(&anchor)?,
        Duration::from_secs(10),
    )
    .await?;
    let token = client.access_token(device, scope).await?;
    println!("{}", hex::encode(client.present(&token)?));
    client.close().await;
    Ok(())
}
