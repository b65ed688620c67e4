//! `firmware-sim`: runs a simulated fleet against its own broker and hub (or a running pair,
//! `--hub-config`) and prints a summary (one JSON object as the last line with `--json`).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tessera_firmware_sim::duration;
use tessera_firmware_sim::external::External;
use tessera_firmware_sim::fleet::{self, Options, RevokeBy, Scenario};

/// Tessera firmware simulator: many devices running the shared core over MQTT.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Start a Mosquitto and a hub of its own (or use a running pair: --hub-config),
    /// register the fleet, run it, print a summary.
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
    /// Device token lifetime set in the hub's policy (whole seconds: `6s`, `1m`)
    /// [default: 60s; with --hub-config, the lifetime the running hub's policy gives
    /// --device-role, which a value given here must match].
    #[arg(long, value_parser = duration::parse)]
    lifetime: Option<Duration>,
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
    /// How the revoke scenario revokes: `mixed` (half with one `revoke --group`, the rest
    /// one `revoke --device` each) or `group` (all with one `revoke --group`).
    #[arg(long, value_enum, default_value_t = RevokeByArg::Mixed)]
    revoke_by: RevokeByArg,
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
    /// Use the running hub this config file (tessera-hub.toml) belongs to instead of
    /// starting one: the fleet is registered on its database with `tessera-hub device
    /// import`, and the devices connect to its broker (or --broker). Only steady, storm,
    /// clock-skew and power-loss run this way.
    #[arg(long)]
    hub_config: Option<PathBuf>,
    /// With --hub-config: the broker the devices connect to, `mqtt://host[:port]` or
    /// `mqtts://host[:port]` [default: the [mqtt] section of the hub's config].
    #[arg(long, requires = "hub_config")]
    broker: Option<String>,
    /// With an mqtts:// broker: the CA certificate (PEM) that signs its certificate
    /// [default: the hub config's [mqtt.tls] ca_file, when --broker is not given].
    #[arg(long, requires = "hub_config")]
    broker_ca: Option<PathBuf>,
    /// With --hub-config: the running hub's process id, to report its CPU time and memory.
    #[arg(long, requires = "hub_config")]
    hub_pid: Option<u32>,
    /// With --hub-config: the running broker's process id, to report its CPU time and
    /// memory.
    #[arg(long, requires = "hub_config")]
    broker_pid: Option<u32>,
    /// With --hub-config: the device role of the hub's policy the fleet is registered with.
    #[arg(long, default_value = "sensor", requires = "hub_config")]
    device_role: String,
    /// With --hub-config: the group of the hub's policy the fleet is registered in.
    #[arg(long, default_value = "building-a", requires = "hub_config")]
    device_group: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RevokeByArg {
    /// Half with one `revoke --group`, the rest with one `revoke --device` each.
    Mixed,
    /// All with one `revoke --group`.
    Group,
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
        revoke_by: match args.revoke_by {
            RevokeByArg::Mixed => RevokeBy::Mixed,
            RevokeByArg::Group => RevokeBy::Group,
        },
        untrusted_clock_share: args.untrusted_clock_share,
        power_cut_rate: args.power_cut_rate,
        hub_bin: args.hub_bin,
        mosquitto: args.mosquitto,
        progress: std::io::stdout().is_terminal(),
        external: args.hub_config.map(|hub_config| External {
            hub_config,
            broker: args.broker,
            broker_ca: args.broker_ca,
            hub_pid: args.hub_pid,
            broker_pid: args.broker_pid,
            device_role: args.device_role,
            device_group: args.device_group,
        }),
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
