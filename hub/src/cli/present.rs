//! `present`: builds a proof-of-possession presentation as a control app would
//! (PROTOCOL.md §13), so the app → device path can be tried with the shipped binaries:
//! `tessera-hub access-token …` gives the token, `present` signs it for one device, and the
//! device's `tessera-agent verify` (or `VERIFY` on its socket) checks it.
//!
//! It needs no hub files and no broker: only the app's key and its token.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_hub::keyfile;
use tessera_shared::message::validate_id;
use tessera_shared::token::MAX_TOKEN_LEN;

/// What `present` signs, and with which key.
#[derive(Args)]
pub(super) struct PresentArgs {
    /// The app's private key (PKCS#8 PEM): the key the access token's `cnf` names.
    #[arg(long)]
    key: PathBuf,
    /// The access token in hex, as `access-token` prints it (surrounding spaces ignored).
    #[arg(long)]
    token: String,
    /// The device the token is presented to (the token's audience).
    #[arg(long)]
    device: String,
    /// The presentation's time, Unix seconds (default: now). Devices refuse one more than
    /// their `presentation_window_s` (60 s by default) away from their clock.
    #[arg(long)]
    issued_at: Option<u64>,
}

/// Signs a presentation of the token to the device with the app's key and prints it in hex,
/// ready for `tessera-agent verify --scope S HEX` or `VERIFY <scope> <hex>` on the agent's
/// socket.
pub(super) fn present(args: &PresentArgs) -> Result<()> {
    validate_id(&args.device)
        .map_err(|_| anyhow::anyhow!("invalid device id `{}`", args.device))?;
    let token = hex::decode(args.token.trim()).context("--token is not hex")?;
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        bail!(
            "--token is {} bytes: an access token is 1 to {MAX_TOKEN_LEN} bytes",
            token.len()
        );
    }
    let holder = keyfile::read_private(&args.key)?;
    let issued_at = match args.issued_at {
        Some(t) => t,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the system clock is before 1970")?
            .as_secs(),
    };
    let presentation = tessera_hub::client::present(&holder, &token, &args.device, issued_at)
        .map_err(|e| anyhow::anyhow!("cannot build the presentation: {e}"))?;
    println!("{}", hex::encode(presentation));
    Ok(())
}
