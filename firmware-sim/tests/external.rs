//! `firmware-sim run --hub-config` end to end: a Mosquitto (TLS) and a `tessera-hub serve`
//! already running as separate processes, started by the test as an operator would start
//! them, with 8-second device tokens in the hub's policy. The simulator registers 20
//! devices on that hub's database with `device import`, connects them to the broker over
//! `mqtts://` with the broker's CA, runs them for 16 s, and none of them ever goes without
//! a valid token. It leaves the hub and the broker running, and it measures their CPU time
//! by the pids it is given. The scenarios that kill the hub or restart the broker refuse
//! to run against them.
//!
//! Needs Mosquitto (`$MOSQUITTO` or /usr/sbin/mosquitto); `tessera-hub` is built if needed.

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use common::{field, run_sim};
use tessera_tests::hub::{TestHub, Transport};

const DEVICES: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_runs_against_a_running_broker_and_hub_and_never_lapses() -> Result<()> {
    let hub = TestHub::builder()
        .hub_id("sim-external")
        .transport(Transport::Tls)
        .policy("token_lifetime_s = 600", "token_lifetime_s = 8")
        .start()
        .await?;
    let config = hub.dir().config_path();
    let ca = hub.dir().path().join("broker-ca.pem");
    let hub_pid = hub.pid().context("the hub runs")?;
    let broker_pid = hub.broker().pid().context("the broker runs")?;
    let broker = format!("mqtts://{}:{}", hub.broker().host(), hub.broker().port());

    let args: Vec<String> = [
        "--devices",
        "20",
        "--duration",
        "16s",
        "--scenario",
        "steady",
        "--hub-config",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([config.display().to_string()])
    .chain(["--broker".into(), broker.clone(), "--broker-ca".into()])
    .chain([ca.display().to_string()])
    .chain(["--hub-pid".into(), hub_pid.to_string()])
    .chain(["--broker-pid".into(), broker_pid.to_string()])
    .collect();
    // Bounded: 16 s of run plus registration and teardown.
    let (summary, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_sim(&args, Duration::from_secs(120))
    })
    .await??;
    let field = |name: &str| field(&summary, name);
    ensure!(summary["external"] == true, "{summary}");
    ensure!(summary["broker"] == broker.as_str(), "{summary}");
    ensure!(field("devices")? == DEVICES, "{summary}");
    // The lifetime is the running hub's policy's: the simulator cannot change it.
    ensure!(field("lifetime_s")? == 8, "{summary}");
    ensure!(
        field("lapses")? == 0,
        "a device lapsed: {summary}\n{stderr}"
    );
    ensure!(field("device_failures")? == 0, "{summary}\n{stderr}");
    ensure!(field("never_held")? == 0, "{summary}");
    ensure!(field("holding_at_end")? == DEVICES, "{summary}");
    ensure!(field("min_tokens_per_device")? >= 2, "{summary}");
    ensure!(summary["hub_ran_throughout"] == true, "{summary}");
    // Measured by the pids given.
    for name in ["hub_cpu_s", "hub_cpu_cores", "broker_cpu_s", "hub_rss_mb"] {
        ensure!(summary[name].is_f64(), "no {name}: {summary}");
    }

    // The hub and the broker are still there, and the fleet is registered on the hub's
    // database under the run's own prefix.
    ensure!(hub.pid() == Some(hub_pid), "the hub was stopped");
    let clients = hub
        .dir()
        .run(&["client", "list", "--kind", "device", "--json"])?;
    let clients: serde_json::Value = serde_json::from_str(&clients)?;
    let fleet = clients
        .as_array()
        .context("a JSON array")?
        .iter()
        .filter(|c| c["id"].as_str().is_some_and(|id| id.starts_with("sim-")))
        .count();
    ensure!(
        fleet == 20,
        "{fleet} simulated devices registered: {clients}"
    );

    // What would kill or restart them refuses to start.
    for scenario in ["hub-crash", "broker-restart"] {
        let output = Command::new(env!("CARGO_BIN_EXE_firmware-sim"))
            .args(["run", "--devices", "2", "--duration", "5s", "--scenario"])
            .arg(scenario)
            .arg("--hub-config")
            .arg(&config)
            .arg("--hub-bin")
            .arg(tessera_tests::cargo_bin("tessera-hub")?)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(!output.status.success(), "{scenario} ran: {stderr}");
        ensure!(
            stderr.contains("cannot run against a running broker and hub"),
            "{scenario}: {stderr}"
        );
    }
    ensure!(hub.pid() == Some(hub_pid), "the hub was stopped");
    Ok(())
}
