//! Key rotation with very short lifetimes (seconds), while a device keeps refreshing: the
//! running hub publishes the next key before it signs with it, switches, and drops the old
//! key once every token it signed has expired — and the device, following the key set
//! from its trust anchor, never receives a token it cannot verify.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use tessera_hub::client::Answer;
use tessera_shared::keyset::KeySet;
use tessera_shared::message::RequestBody;
use tessera_shared::token::{self, Validation};
use tessera_shared::topic;
use tessera_tests::QoS;
use tessera_tests::hub::{TestHub, unix_now};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_device_refreshing_through_a_key_rotation_only_ever_gets_tokens_it_can_verify()
-> Result<()> {
    let hub = TestHub::builder()
        // A heartbeat longer than a second, so that counting the announce period from
        // `keys rotate` instead of from the key set's publication would show.
        .config("heartbeat_s = 30", "heartbeat_s = 3")
        .config("rotation_announce_s = 300", "rotation_announce_s = 4")
        .policy("leeway_s = 30", "leeway_s = 1")
        .policy("token_lifetime_s = 600", "token_lifetime_s = 3")
        .policy("token_lifetime_s = 120", "token_lifetime_s = 2")
        .start()
        .await?;
    let anchor = hub.trust_anchor();
    let (mut device, _) = hub
        .enrolled_device("rot-sensor", "sensor", &["building-a"])
        .await?;
    let Answer::Token {
        token: first,
        grant: Some((mut grant, _)),
    } = device.request(RequestBody::DeviceToken, WAIT).await?
    else {
        bail!("expected a token and a grant")
    };

    // What a verifier provisioned with the trust anchor holds, kept current from the
    // retained key set topic.
    let mut held = KeySet::from_anchor(anchor);
    let mut keys = hub.broker().probe("rot-keys").await?;
    keys.subscribe_granted(topic::KEYS, QoS::AtLeastOnce)
        .await?;
    held.update(&keys.expect_message(topic::KEYS, WAIT).await?.payload)
        .map_err(|e| anyhow::anyhow!("initial key set: {e}"))?;
    assert_eq!(held.keys(), [anchor]);

    let printed = hub.dir().run(&["keys", "rotate"])?;
    let next = printed
        .strip_prefix("next signing key ")
        .and_then(|s| s.split(':').next())
        .filter(|kid| kid.len() == 16 && kid.bytes().all(|b| b.is_ascii_hexdigit()))
        .with_context(|| format!("keys rotate printed {printed:?}"))?
        .to_owned();
    let rotated_at = Instant::now();

    // Refresh every 400 ms (lifetime 3 s) until the old key is gone from the key set.
    let mut signed_by_next = 0;
    let mut announced_before_use = false;
    let mut next_published: Option<Instant> = None;
    let mut next_first_used: Option<Instant> = None;
    let deadline = rotated_at + Duration::from_secs(30);
    loop {
        for message in keys.take_messages() {
            held.update(&message.payload)
                .map_err(|e| anyhow::anyhow!("a key set that does not verify: {e}"))?;
            // When the key set naming the next key arrived, not when this loop saw it.
            if next_published.is_none() && held.keys().iter().any(|k| hex::encode(k.kid()) == next)
            {
                next_published = Some(message.received_at);
            }
        }
        let held_kids: Vec<String> = held.keys().iter().map(|k| hex::encode(k.kid())).collect();
        let Answer::Token {
            token,
            grant: Some((new_grant, _)),
        } = device
            .request(RequestBody::Refresh { grant: &grant }, WAIT)
            .await
            .with_context(|| format!("refresh {:?} after the rotation", rotated_at.elapsed()))?
        else {
            bail!("expected a token and a grant")
        };
        grant = new_grant;
        // Drain key sets that arrived with the answer before judging the token.
        for message in keys.take_messages() {
            held.update(&message.payload)
                .map_err(|e| anyhow::anyhow!("a key set that does not verify: {e}"))?;
            // When the key set naming the next key arrived, not when this loop saw it.
            if next_published.is_none() && held.keys().iter().any(|k| hex::encode(k.kid()) == next)
            {
                next_published = Some(message.received_at);
            }
        }
        let verified = token::verify(&token, &held, &Validation::new(unix_now(), "tessera"))
            .map_err(|e| {
                anyhow::anyhow!(
                    "the device got a token it cannot verify with the published keys {held_kids:?} \
                 ({:?} after the rotation): {e}",
                    rotated_at.elapsed()
                )
            })?;
        if hex::encode(verified.kid()) == next {
            if signed_by_next == 0 {
                announced_before_use = held_kids.contains(&next);
                next_first_used = Some(Instant::now());
            }
            signed_by_next += 1;
        }
        let only_next = held.keys().len() == 1 && hex::encode(held.keys()[0].kid()) == next;
        if only_next && signed_by_next > 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no full rotation within 30 s: {signed_by_next} tokens by the next key {next}, key \
             set {held_kids:?}; `keys list`:\n{}\nhub log:\n{}",
            hub.dir()
                .run(&["keys", "list"])
                .unwrap_or_else(|e| e.to_string()),
            hub.log()
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    device.close().await;

    assert!(
        announced_before_use,
        "the next key was in the published key set before the first token it signed"
    );
    // For the whole announce period (4 s, counted in whole seconds from the publication,
    // so at least 3 s of wall-clock time), not from `keys rotate`.
    let (published, used) = (next_published.unwrap(), next_first_used.unwrap());
    assert!(
        used.duration_since(published) >= Duration::from_millis(2900),
        "the next key signed {:?} after the key set announcing it went out (rotated {:?} \
         before that)",
        used.duration_since(published),
        published.duration_since(rotated_at)
    );
    // Retired: announce (4 s) + the longest lifetime (3 s) + leeway (1 s) after the key set
    // with the next key went out (at the first heartbeat after rotating, so no earlier
    // than rotating), counted in whole seconds, so up to one second early in wall-clock
    // time.
    assert!(
        published.elapsed() >= Duration::from_secs(7),
        "the old key was dropped after {:?}, before its last tokens expired",
        rotated_at.elapsed()
    );
    // A verifier with the final set no longer knows the old key.
    assert!(token::verify(&first, &held, &Validation::new(unix_now(), "tessera")).is_err());
    Ok(())
}
