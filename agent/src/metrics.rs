//! The agent's facts as Prometheus metrics (docs/METRICS.md, "Agent"): what a device
//! monitor needs to see that the device holds a valid token, refreshes, and knows its
//! revocations. `tessera-agent status --prometheus` prints them; with `metrics_textfile`
//! set, `run` keeps them in that file for node_exporter's textfile collector.
//!
//! The text is prometheus-client's exposition of a registry built from one [`Status`], so
//! it says exactly what `status --json` says.

use std::path::Path;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::error::Error;
use crate::status::Status;

/// The prefix of every metric name.
const PREFIX: &str = "tessera_agent";

/// The device a metric is about; the `state` of [`Status`] on `tessera_agent_info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Labels {
    device: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct InfoLabels {
    device: String,
    state: String,
}

fn gauge(registry: &mut Registry, device: &str, name: &str, help: &str, value: i64) {
    let family = Family::<Labels, Gauge>::default();
    family
        .get_or_create(&Labels {
            device: device.to_owned(),
        })
        .set(value);
    registry.register(name, help, family);
}

fn counter(registry: &mut Registry, device: &str, name: &str, help: &str, value: u64) {
    let family = Family::<Labels, Counter>::default();
    family
        .get_or_create(&Labels {
            device: device.to_owned(),
        })
        .inc_by(value);
    registry.register(name, help, family);
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `status` in the Prometheus text format.
pub fn render(status: &Status) -> String {
    let mut registry = Registry::with_prefix(PREFIX);
    let device = status.device_id.as_str();
    let info = Family::<InfoLabels, Gauge>::default();
    info.get_or_create(&InfoLabels {
        device: device.to_owned(),
        state: status.state.clone(),
    })
    .set(1);
    registry.register(
        "info",
        "Always 1; its `state` label is the agent's state (holding, refreshing, revoked, stopped…)",
        info,
    );
    gauge(
        &mut registry,
        device,
        "running",
        "1 when this came from the running agent, 0 when read from its store",
        flag(status.running),
    );
    gauge(
        &mut registry,
        device,
        "token_valid",
        "1 when the device holds a device token valid now (by the hub's time)",
        flag(status.token_valid),
    );
    let hub_now_s = status.now_ms.saturating_add_signed(status.clock_offset_ms) / 1000;
    if let Some(exp) = status.token_expires_at {
        gauge(
            &mut registry,
            device,
            "token_expires_in_seconds",
            "Seconds until the held device token expires (negative: expired)",
            clamp(exp) - clamp(hub_now_s),
        );
    }
    counter(
        &mut registry,
        device,
        "renewals",
        "Device tokens received since the agent started",
        status.renewals,
    );
    counter(
        &mut registry,
        device,
        "refresh_failures",
        "Device-token requests the hub refused or did not answer in time, since the agent started",
        status.refresh_failures,
    );
    if let Some(connected) = status.connected {
        gauge(
            &mut registry,
            device,
            "broker_connected",
            "1 when connected to the broker",
            flag(connected),
        );
    }
    if let Some(fresh) = status.revocation_fresh {
        gauge(
            &mut registry,
            device,
            "revocation_fresh",
            "1 when the revocation knowledge is complete and within its max age (presentations are refused otherwise)",
            flag(fresh),
        );
    }
    if let Some(as_of) = status.revocation_fresh_as_of {
        gauge(
            &mut registry,
            device,
            "revocation_age_seconds",
            "Seconds since the hub time the revocation list is known complete as of",
            clamp(hub_now_s) - clamp(as_of),
        );
    }
    if let Some(entries) = status.revocation_entries {
        gauge(
            &mut registry,
            device,
            "revocation_entries",
            "Revocation entries addressed to this device that it holds",
            clamp(u64::try_from(entries).unwrap_or(u64::MAX)),
        );
    }
    gauge(
        &mut registry,
        device,
        "store_unsaved",
        "1 while the token and grant in force are not saved (the store cannot be written)",
        flag(status.store_unsaved_since_ms.is_some()),
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// Writes `status` to the textfile at `path` atomically (a temporary file beside it, then
/// a rename), so the collector never reads half a file.
pub fn write_textfile(path: &Path, status: &Status) -> Result<(), Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let what = || format!("cannot write the metrics textfile {}", path.display());
    std::fs::write(&tmp, render(status)).map_err(Error::io(what()))?;
    std::fs::rename(&tmp, path).map_err(Error::io(what()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, name: &str) -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    }

    #[test]
    fn the_metrics_say_what_the_status_says() {
        let mut status = Status::without_store("door-1", "holding", None, 10_000_000, false);
        status.running = true;
        status.token_valid = true;
        status.token_expires_at = Some(10_060);
        status.renewals = 3;
        status.refresh_failures = 2;
        status.connected = Some(true);
        status.revocation_fresh = Some(false);
        status.revocation_fresh_as_of = Some(9_910);
        let text = render(&status);
        assert_eq!(
            value(&text, "tessera_agent_token_valid").as_deref(),
            Some("1"),
            "{text}"
        );
        assert_eq!(
            value(&text, "tessera_agent_token_expires_in_seconds").as_deref(),
            Some("60"),
            "{text}"
        );
        assert_eq!(
            value(&text, "tessera_agent_renewals_total").as_deref(),
            Some("3")
        );
        assert_eq!(
            value(&text, "tessera_agent_refresh_failures_total").as_deref(),
            Some("2")
        );
        assert_eq!(
            value(&text, "tessera_agent_revocation_fresh").as_deref(),
            Some("0")
        );
        assert_eq!(
            value(&text, "tessera_agent_revocation_age_seconds").as_deref(),
            Some("90")
        );
        assert!(
            text.contains("tessera_agent_info{device=\"door-1\",state=\"holding\"} 1"),
            "{text}"
        );
        // Facts only a running agent has are left out, not reported as zero.
        let stopped = Status::without_store("door-1", "stopped", None, 10_000_000, false);
        let text = render(&stopped);
        assert_eq!(
            value(&text, "tessera_agent_revocation_fresh"),
            None,
            "{text}"
        );
        assert_eq!(
            value(&text, "tessera_agent_token_valid").as_deref(),
            Some("0")
        );
    }

    #[test]
    fn the_textfile_is_replaced_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tessera-agent.prom");
        let status = Status::without_store("door-1", "stopped", None, 0, false);
        write_textfile(&path, &status).expect("written");
        write_textfile(&path, &status).expect("replaced");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.contains("tessera_agent_info"), "{text}");
        assert!(!dir.path().join("tessera-agent.prom.tmp").exists());
    }
}
