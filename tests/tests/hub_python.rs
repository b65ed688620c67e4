//! Tokens a running hub issues verify with an independent implementation: the Python `cwt`
//! package (and `pycose`), given nothing but the trust anchor `tessera-hub init` printed —
//! as the PEM file it wrote and as the COSE_Key hex it printed.
//!
//! Uses the venv of `scripts/interop` (`target/interop-venv`), creating it the same way
//! when it is missing or stale. Without Python 3, its venv module or PyPI, the test fails
//! and says what is missing: it is never skipped.
//!
//! The last test is the Python package's (`pip install ./python`, in `target/sdk-venv`):
//! its end-to-end script against a real hub over TLS, its presentation checked by the
//! core's verifier as a device runs it (tests/hub_present.rs runs the package's example
//! app against a running agent).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use sha2::{Digest as _, Sha256};
use tessera_hub::client::Answer;
use tessera_shared::message::RequestBody;
use tessera_shared::scope::Scopes;
use tessera_tests::hub::TestHub;

const WAIT: Duration = Duration::from_secs(5);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn run(command: &mut Command) -> Result<Output> {
    let shown = format!("{command:?}");
    command
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))
}

/// The interpreter of `target/interop-venv`, made as `scripts/interop` makes it: reused
/// while its stamp (SHA-256 of the requirements and the interpreter's version) matches,
/// else created again with `python3 -m venv` and `pip install -r interop/requirements.txt`.
fn interop_python() -> Result<PathBuf> {
    let root = workspace_root();
    let venv = root.join("target/interop-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(".requirements.sha256");
    let requirements = root.join("interop/requirements.txt");
    let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());

    let version = run(Command::new(&system).args(["-c", "import sys; print(sys.version)"]))
        .ok()
        .filter(|o| o.status.success())
        .with_context(|| {
            format!(
                "the hub's Python interop test needs Python 3, and `{system}` does not run: \
                 install it (for example `apt-get install python3 python3-venv`) or point \
                 $PYTHON at one"
            )
        })?
        .stdout;
    let mut hasher = Sha256::new();
    hasher.update(std::fs::read(&requirements).context("reading interop/requirements.txt")?);
    hasher.update(&version);
    let want = hex::encode(hasher.finalize());
    let have = std::fs::read_to_string(&stamp).unwrap_or_default();
    if python.is_file() && have.trim() == want {
        return Ok(python);
    }

    eprintln!(
        "hub_python: creating {} (as scripts/interop does)",
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    tessera_tests::python::create_venv(&venv)?;
    let installed = run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
            "-r",
        ])
        .arg(&requirements))?;
    if !installed.status.success() {
        let _ = std::fs::remove_dir_all(&venv);
        bail!(
            "pip could not install interop/requirements.txt (is PyPI reachable?); the hub's \
             Python interop test cannot run:\n{}",
            String::from_utf8_lossy(&installed.stderr)
        );
    }
    std::fs::write(&stamp, format!("{want}\n")).context("writing the venv's stamp")?;
    Ok(python)
}

enum Anchor<'a> {
    Pem(&'a Path),
    CoseHex(&'a str),
}

/// Runs interop/verify_hub_token.py; `Ok(stdout)` when it accepts, `Err(stderr)` when it
/// refuses.
fn python_verify(
    python: &Path,
    anchor: &Anchor<'_>,
    token: &[u8],
    audience: &str,
    issuer: &str,
    scope: &str,
) -> Result<std::result::Result<String, String>> {
    let mut command = Command::new(python);
    command.arg(workspace_root().join("interop/verify_hub_token.py"));
    match anchor {
        Anchor::Pem(path) => command.arg("--anchor-pem").arg(path),
        Anchor::CoseHex(hex) => command.args(["--anchor-cose-hex", hex]),
    };
    command.args(["--token-hex", &hex::encode(token)]).args([
        "--audience",
        audience,
        "--issuer",
        issuer,
        "--scope",
        scope,
    ]);
    let output = run(&mut command)?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    match output.status.code() {
        Some(0) => Ok(Ok(stdout)),
        Some(1) if stderr.starts_with("REFUSED:") => Ok(Err(stderr)),
        _ => bail!(
            "verify_hub_token.py failed ({}):\n{stdout}{stderr}",
            output.status
        ),
    }
}

#[tokio::test]
async fn python_cwt_verifies_hub_tokens_given_only_the_trust_anchor_init_printed() -> Result<()> {
    let python = interop_python()?;
    let hub = TestHub::builder().hub_id("hub-python").start().await?;
    assert!(
        hub.dir()
            .init_output()
            .contains(hub.dir().trust_anchor_cose_hex()),
        "the COSE_Key hex is what init printed"
    );
    let device_key = hub
        .dir()
        .add_device("py-sensor", "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app("py-app", "controller")?;

    let mut device = hub.client("py-sensor", &device_key).await?;
    device
        .request(
            RequestBody::Enroll {
                key: device_key.public_key()?,
                code_proof: None,
            },
            WAIT,
        )
        .await?;
    let Answer::Token {
        token: device_token,
        ..
    } = device.request(RequestBody::DeviceToken, WAIT).await?
    else {
        bail!("expected a device token")
    };
    device.close().await;
    let mut app = hub.client("py-app", &app_key).await?;
    let Answer::Token {
        token: access_token,
        ..
    } = app
        .request(
            RequestBody::AccessToken {
                device: "py-sensor",
                scope: Scopes::parse("door:open light:on").unwrap(),
            },
            WAIT,
        )
        .await?
    else {
        bail!("expected an access token")
    };
    app.close().await;

    let pem = hub.dir().trust_anchor_path();
    let anchors = [
        Anchor::Pem(&pem),
        Anchor::CoseHex(hub.dir().trust_anchor_cose_hex()),
    ];
    let cases = [
        (
            &device_token,
            "tessera",
            "telemetry:write",
            "py-sensor",
            &device_key,
        ),
        (&access_token, "py-sensor", "light:on", "py-app", &app_key),
    ];
    for anchor in &anchors {
        for (token, audience, scope, subject, holder) in cases {
            let claims = python_verify(&python, anchor, token, audience, "hub-python", scope)?
                .map_err(|refusal| anyhow::anyhow!("Python refused a hub token: {refusal}"))?;
            assert!(
                claims.contains(&format!("\"sub\": \"{subject}\"")),
                "{claims}"
            );
            assert!(
                claims.contains(&format!("\"aud\": \"{audience}\"")),
                "{claims}"
            );
            let (x, _) = holder.public_key()?.coordinates();
            assert!(
                claims.contains(&hex::encode(x)),
                "cnf is the holder's key: {claims}"
            );
        }
    }

    // And Python refuses what it must: a flipped signature bit, another audience, a
    // scope the token does not grant, another hub's anchor.
    let mut tampered = access_token.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let other_hub = tessera_tests::hub::generate_signer();
    let other_pem = hub.dir().path().join("other-anchor.pem");
    std::fs::write(
        &other_pem,
        tessera_hub::keyfile::public_to_pem(&tessera_shared::crypto::Signer::public_key(
            &other_hub,
        )),
    )?;
    // `why` is what the refusal must name: cwt itself, or the script's own claim check.
    let refusals = [
        (
            Anchor::Pem(&pem),
            &tampered,
            "py-sensor",
            "door:open",
            "cwt: VerifyError",
        ),
        (
            Anchor::Pem(&pem),
            &access_token,
            "py-other",
            "door:open",
            "aud 'py-sensor'",
        ),
        (
            Anchor::Pem(&pem),
            &access_token,
            "py-sensor",
            "door:close",
            "does not grant",
        ),
        (
            Anchor::Pem(&other_pem),
            &access_token,
            "py-sensor",
            "door:open",
            "cwt:",
        ),
    ];
    for (anchor, token, audience, scope, why) in &refusals {
        match python_verify(&python, anchor, token, audience, "hub-python", scope)? {
            Ok(claims) => bail!("Python accepted a bad token ({why}): {claims}"),
            Err(refusal) => assert!(refusal.contains(why), "{why}: {refusal}"),
        }
    }
    Ok(())
}

/// What a device with id `device` decides about `presentation` for `scope` at `now`.
fn device_accepts(hub: &TestHub, presentation: &[u8], device: &str, scope: &str) -> Result<String> {
    let validation = tessera_shared::token::Validation::new(tessera_tests::hub::unix_now(), device)
        .with_scope(scope)
        .with_issuer(hub.dir().hub_id());
    let checked = tessera_shared::message::SignedPresentation::verify(
        presentation,
        &hub.trust_anchor(),
        &validation,
        60,
    )
    .map_err(|e| anyhow::anyhow!("the device refused the presentation: {e}"))?;
    Ok(checked.token.claims().sub.to_owned())
}

#[tokio::test]
async fn the_python_package_gets_presents_and_revokes_tokens_against_a_real_hub() -> Result<()> {
    let python = tessera_tests::python::sdk_python()?;
    // Over TLS: the package's client takes the broker's CA.
    let hub = TestHub::builder()
        .transport(tessera_tests::hub::Transport::Tls)
        .start()
        .await?;
    let device = "py-door";
    hub.dir().add_device(device, "sensor", &["building-a"])?;
    let app_key = hub.dir().add_app("py-sdk-app", "controller")?;
    let ops_key = hub.dir().add_operator("py-sdk-ops", "ops")?;
    let port = hub.broker().port().to_string();

    let output = run(Command::new(&python)
        .arg(workspace_root().join("python/tests/e2e.py"))
        .env("TESSERA_HOST", "127.0.0.1")
        .env("TESSERA_PORT", &port)
        .env("TESSERA_ANCHOR", hub.dir().trust_anchor_path())
        .env("TESSERA_TLS_CA", hub.dir().path().join("broker-ca.pem"))
        .env("TESSERA_DEVICE", device)
        .env("TESSERA_APP", "py-sdk-app")
        .env("TESSERA_APP_KEY", app_key.private_path())
        .env("TESSERA_OPS", "py-sdk-ops")
        .env("TESSERA_OPS_KEY", ops_key.private_path()))?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    ensure!(
        output.status.success(),
        "python/tests/e2e.py failed ({}):\n{stdout}{stderr}\n{}",
        output.status,
        hub.log()
    );
    let result: serde_json::Value =
        serde_json::from_str(stdout.trim()).with_context(|| format!("e2e.py printed: {stdout}"))?;
    let presentation = hex::decode(result["presentation"].as_str().unwrap_or_default())?;
    assert_eq!(
        device_accepts(&hub, &presentation, device, "door:open")?,
        "py-sdk-app"
    );
    assert_eq!(result["revoked"][0], 1, "{result}");

    Ok(())
}
