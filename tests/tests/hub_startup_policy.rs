//! `serve` reviews the policy file before serving, as a SIGHUP reload does (issue 9, item
//! 2): a policy edited while the hub was stopped that leaves registered clients without a
//! role is refused, with the reason and the way to force it; forced with `policy force`
//! (the same marker a reload reads), it is served, and the marker is used up.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Result, bail};
use tessera_tests::ChildGuard;
use tessera_tests::hub::{HubDir, READY_CLIENT};

const STARTUP: Duration = Duration::from_secs(15);

fn serve(dir: &HubDir) -> Result<ChildGuard> {
    let mut serve = dir.command()?;
    serve.arg("serve").env("RUST_LOG", "info");
    ChildGuard::spawn(&mut serve)
}

#[test]
fn serve_refuses_a_policy_emptied_while_the_hub_was_stopped_unless_forced() -> Result<()> {
    let dir = HubDir::init("hub-startup-policy")?;
    dir.add_device("sp-door", "sensor", &["building-a"])?;
    std::fs::write(dir.policy_path(), "")?;

    let mut refused = serve(&dir)?;
    let Some(status) = refused.wait_timeout(STARTUP)? else {
        bail!("serve started on an emptied policy:\n{}", refused.output());
    };
    let output = refused.output();
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("registered clients would have no role")
            && output.contains("sp-door")
            && output.contains(READY_CLIENT),
        "it names the clients left without a role:\n{output}"
    );
    assert!(
        output.contains("not serving with this policy") && output.contains("policy force"),
        "it says how to apply it anyway:\n{output}"
    );
    assert!(!output.contains("hub serving"), "{output}");

    // Forced, the same way a reload is: the hub starts, and the marker forces only once.
    dir.run(&["policy", "force"])?;
    let marker = format!("{}.force", dir.policy_path().display());
    assert!(std::path::Path::new(&marker).exists());
    let mut forced = serve(&dir)?;
    forced.wait_for_output("hub serving", STARTUP)?;
    assert!(
        forced
            .output()
            .contains("policy load at start: forced by its force marker"),
        "{}",
        forced.output()
    );
    assert!(
        !std::path::Path::new(&marker).exists(),
        "the marker is used up"
    );
    forced.kill_9()?;

    // Both starts are in the audit log, as reloads are.
    let audit = dir.run(&["audit", "--action", "policy_reload"])?;
    assert!(
        audit.contains("at start: refused, not forced") && audit.contains("at start: applied"),
        "{audit}"
    );

    // Not forced again: refused again.
    let mut again = serve(&dir)?;
    let Some(status) = again.wait_timeout(STARTUP)? else {
        bail!("the force marker forced twice:\n{}", again.output());
    };
    assert!(!status.success(), "{}", again.output());
    Ok(())
}

#[test]
fn serve_starts_on_an_unchanged_policy_without_any_marker() -> Result<()> {
    let dir = HubDir::init("hub-startup-ok")?;
    dir.add_device("ok-door", "sensor", &["building-a"])?;
    let mut hub = serve(&dir)?;
    hub.wait_for_output("hub serving", STARTUP)?;
    hub.kill_9()?;
    Ok(())
}
