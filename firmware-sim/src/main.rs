//! `firmware-sim`: runs a simulated fleet against its own broker and hub and prints a
//! summary (one JSON object as the last line with `--json`).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tessera_firmware_sim::duration;
use tessera_firmware_sim::fleet::{self, Options, Scenario};

/// Tessera firmware simulator: many devices running the shared core over MQTT.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Start a Mosquitto and a hub of its own, register the fleet, run it, print a summary.
    Run(RunArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScenarioArg {
    /// Devices enroll over a short ramp and keep their tokens fresh; nothing fails.
    Steady,
    /// Every device boots and enrolls at the same moment, then refreshes as in steady.
    Storm,
    /// As steady; a third of the way in the hub is killed (SIGKILL) and restarted after
    /// --outage.
    HubCrash,
    /// As steady; a third of the way in Mosquitto is stopped and restarted on the same
    /// port after --outage.
    BrokerRestart,
    /// As steady; a third of the way in an operator revokes --revoke-share of the fleet,
    /// half as a group, the rest one by one.
    Revoke,
    /// Every device has its own clock: those with trust_local_clock = false
    /// (--untrusted-clock-share) a wrong one (up to a day off or counting from zero,
    /// drifting up to 2 %), the others a nearly right one (±200 ms, ±100 ppm).
    ClockSkew,
    /// Power fails during --power-cut-rate of the flash writes, tearing the record being
    /// written; the device boots again from what its flash reads back.
    PowerLoss,
    /// From a third of the way in, a compromised device replays requests, responses and
    /// presentations, forges tokens and control messages, presents stolen grants and
    /// tokens, speaks for other devices and floods the hub; counts attacks_rejected and
    /// attacks_accepted.
    Malicious,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Device token lifetime set in the hub's policy (whole seconds: `6s`, `1m`).
    #[arg(long, value_parser = duration::parse, default_value = "60s")]
    lifetime: Duration,
    /// How long the fleet runs once the hub serves (`20s`, `10m`).
    #[arg(long, value_parser = duration::parse, default_value = "60s")]
    duration: Duration,
    /// What the fleet goes through.
    #[arg(long, value_enum, default_value_t = ScenarioArg::Steady)]
    scenario: ScenarioArg,
    /// How long the hub (hub-crash) or the broker (broker-restart) stays down.
    #[arg(long, value_parser = duration::parse, default_value = "3s")]
    outage: Duration,
    /// The share of the fleet the revoke scenario revokes (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    revoke_share: f64,
    /// The share of the fleet whose machine does not trust its local clock
    /// (trust_local_clock = false), 0 to 1 [default: 0.5 in clock-skew, 1 otherwise].
    #[arg(long)]
    untrusted_clock_share: Option<f64>,
    /// The share of flash writes power fails during, in power-loss (0 to 1).
    #[arg(long, default_value_t = 0.2)]
    power_cut_rate: f64,
    /// Print the summary as one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
    /// The tessera-hub binary (default: next to this executable, then
    /// $CARGO_TARGET_DIR/{debug,release}, then the target dir `cargo metadata` names).
    #[arg(long, env = "TESSERA_HUB_BIN")]
    hub_bin: Option<PathBuf>,
    /// The Mosquitto binary (default: /usr/sbin/mosquitto, then the PATH).
    #[arg(long, env = "MOSQUITTO")]
    mosquitto: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Commands::Run(args) = Cli::parse().command;
    let summary = fleet::run(Options {
        devices: args.devices,
        lifetime: args.lifetime,
        duration: args.duration,
        scenario: match args.scenario {
            ScenarioArg::Steady => Scenario::Steady,
            ScenarioArg::HubCrash => Scenario::HubCrash,
            ScenarioArg::BrokerRestart => Scenario::BrokerRestart,
            ScenarioArg::Revoke => Scenario::Revoke,
            ScenarioArg::Storm => Scenario::Storm,
            ScenarioArg::ClockSkew => Scenario::ClockSkew,
            ScenarioArg::PowerLoss => Scenario::PowerLoss,
            ScenarioArg::Malicious => Scenario::Malicious,
        },
        outage: args.outage,
        revoke_share: args.revoke_share,
        untrusted_clock_share: args.untrusted_clock_share,
        power_cut_rate: args.power_cut_rate,
        hub_bin: args.hub_bin,
        mosquitto: args.mosquitto,
        progress: std::io::stdout().is_terminal(),
    })
    .await?;
    if args.json {
        eprintln!("{}", summary.text());
        println!("{}", summary.to_json());
    } else {
        println!("{}", summary.text());
    }
    Ok(())
}
