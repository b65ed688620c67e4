//! Fleet registration (issue 9): `tessera-hub device import` registers a CSV file of devices
//! all or nothing, reports every bad row (with its line, id and reason) instead of stopping
//! at the first, and writes one-time enrollment codes to a new private file, never to its
//! output.
//!
//! Only the CLI and the database: no broker, no serving hub.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context as _, Result};
use tessera_tests::hub::HubDir;

const HEADER: &str = "id,role,group,key\n";

fn devices(dir: &HubDir) -> Result<String> {
    dir.run(&["client", "list", "--kind", "device"])
}

fn line_of<'a>(listing: &'a str, id: &str) -> &'a str {
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("{id} is not listed:\n{listing}"))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn s(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[test]
fn a_fleet_with_keys_and_codes_is_registered_and_the_codes_go_to_a_private_file() -> Result<()> {
    let dir = HubDir::init("hub-import")?;
    dir.replace_in_policy(
        "building-a = \"Doors and sensors in building A\"",
        "building-a = \"Doors and sensors in building A\"\nbuilding-b = \"More\"",
    )?;
    // Keys in the keys/ directory, named relative to the CSV file there.
    dir.keygen("imp-1")?;
    dir.keygen("imp-3")?;
    let csv = dir.path().join("keys").join("fleet.csv");
    write(
        &csv,
        &format!(
            "{HEADER}\
             # a comment, then a blank line\n\
             \n\
             imp-1,sensor,building-a,imp-1.pem.pub\n\
             imp-2,sensor,building-a;building-b,\n\
             imp-3,sensor,,imp-3.pem.pub\n\
             imp-4,sensor,,\n"
        ),
    )?;
    let codes = dir.path().join("codes.csv");
    let printed = dir.run(&["device", "import", &s(&csv), "--codes", &s(&codes)])?;
    assert!(
        printed.contains("registered 4 devices")
            && printed.contains("2 with their keys, 2 with one-time enrollment codes"),
        "{printed}"
    );

    assert_eq!(
        std::fs::metadata(&codes)?.permissions().mode() & 0o777,
        0o600
    );
    let written = std::fs::read_to_string(&codes)?;
    let mut lines = written.lines();
    assert_eq!(lines.next(), Some("id,code"));
    let coded: Vec<(&str, &str)> = lines.map(|l| l.split_once(',').unwrap()).collect();
    assert_eq!(
        coded.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        ["imp-2", "imp-4"]
    );
    for (_, code) in &coded {
        assert_eq!(code.len(), 23, "{code}");
        assert!(!printed.contains(code), "a code was printed: {printed}");
    }

    let listing = devices(&dir)?;
    assert!(
        line_of(&listing, "imp-1").ends_with("key registered")
            && line_of(&listing, "imp-2").contains("groups=building-a,building-b")
            && line_of(&listing, "imp-2").ends_with("awaiting enrollment")
            && line_of(&listing, "imp-3").ends_with("key registered")
            && line_of(&listing, "imp-4").ends_with("awaiting enrollment"),
        "{listing}"
    );

    // A file of keyed devices needs no codes file.
    dir.keygen("imp-5")?;
    let keyed = dir.path().join("keys").join("keyed.csv");
    write(
        &keyed,
        &format!("{HEADER}imp-5,sensor,building-a,imp-5.pem.pub\n"),
    )?;
    let printed = dir.run(&["device", "import", &s(&keyed)])?;
    assert!(printed.contains("registered 1 device"), "{printed}");
    Ok(())
}

#[test]
fn every_bad_row_is_reported_with_its_line_and_nothing_is_registered() -> Result<()> {
    let dir = HubDir::init("hub-import")?;
    dir.add_device("imp-taken", "sensor", &["building-a"])?;
    dir.keygen("imp-good")?;
    let garbage = dir.path().join("keys").join("garbage.pub");
    write(&garbage, "not a key")?;
    let before = devices(&dir)?;
    let csv = dir.path().join("keys").join("fleet.csv");
    let rows = [
        "imp-ok-1,sensor,building-a,",                 // line 2: good
        "bad id!,sensor,building-a,",                  // 3: invalid id
        "imp-ok-1,sensor,building-a,",                 // 4: duplicate of line 2
        "imp-taken,sensor,building-a,",                // 5: already registered
        "imp-role,nosuchrole,building-a,",             // 6: unknown role
        "imp-app,controller,building-a,",              // 7: an app role
        "imp-group,sensor,building-a;nowhere,",        // 8: unknown group
        "imp-nokey,sensor,building-a,missing.pub",     // 9: no such key file
        "imp-garbage,sensor,building-a,garbage.pub",   // 10: not a key
        "tessera,sensor,building-a,",                  // 11: the device audience
        "hub-import,sensor,,",                         // 12: the hub's id
        "imp-fields,sensor,building-a",                // 13: three fields
        "imp-good,sensor,building-a,imp-good.pem.pub", // 14: good
    ];
    write(&csv, &format!("{HEADER}{}\n", rows.join("\n")))?;
    let codes = dir.path().join("codes.csv");
    let stderr = dir.run_failing(&["device", "import", &s(&csv), "--codes", &s(&codes)])?;

    assert!(
        stderr.contains("11 of 13 rows are bad; nothing was registered"),
        "{stderr}"
    );
    for (line, id, reason) in [
        (3, "bad id!", "invalid id"),
        (4, "imp-ok-1", "duplicate id: also on line 2"),
        (5, "imp-taken", "already registered"),
        (6, "imp-role", "role `nosuchrole` is not defined"),
        (7, "imp-app", "is an app role, not a device role"),
        (8, "imp-group", "unknown group `nowhere`"),
        (9, "imp-nokey", "unreadable key"),
        (10, "imp-garbage", "unreadable key"),
        (11, "tessera", "reserved id"),
        (12, "hub-import", "reserved id"),
        (13, "imp-fields", "expected 4 fields"),
    ] {
        let shown = stderr
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("line {line} ({id}):")))
            .unwrap_or_else(|| panic!("line {line} is not reported:\n{stderr}"));
        assert!(shown.contains(reason), "line {line}: {shown}");
    }
    assert!(
        !stderr.contains("line 2 ") && !stderr.contains("line 14 "),
        "{stderr}"
    );
    assert_eq!(devices(&dir)?, before, "nothing registered");
    assert!(!codes.exists(), "no codes file for a refused import");
    Ok(())
}

#[test]
fn more_than_fifty_bad_rows_are_counted_not_listed() -> Result<()> {
    let dir = HubDir::init("hub-import")?;
    let csv = dir.path().join("fleet.csv");
    let rows: String = (0..80).map(|i| format!("imp-{i},nosuchrole,,\n")).collect();
    write(&csv, &format!("{HEADER}{rows}"))?;
    let codes = dir.path().join("codes.csv");
    let stderr = dir.run_failing(&["device", "import", &s(&csv), "--codes", &s(&codes)])?;
    assert!(stderr.contains("80 of 80 rows are bad"), "{stderr}");
    assert_eq!(stderr.matches("role `nosuchrole`").count(), 50, "{stderr}");
    assert!(stderr.contains("… and 30 more bad rows"), "{stderr}");
    Ok(())
}

#[test]
fn the_header_is_required_and_codes_need_a_new_file() -> Result<()> {
    let dir = HubDir::init("hub-import")?;
    let csv = dir.path().join("fleet.csv");
    let codes = dir.path().join("codes.csv");

    // The old headerless format is refused, naming the header.
    write(&csv, "imp-1,sensor,building-a,\n")?;
    let stderr = dir.run_failing(&["device", "import", &s(&csv), "--codes", &s(&codes)])?;
    assert!(
        stderr.contains("the first line must be the header `id,role,group,key`"),
        "{stderr}"
    );

    // Rows without keys and no --codes: refused, never printed instead.
    write(&csv, &format!("{HEADER}imp-1,sensor,building-a,\n"))?;
    let stderr = dir.run_failing(&["device", "import", &s(&csv)])?;
    assert!(
        stderr.contains("1 row without a key: give --codes FILE"),
        "{stderr}"
    );

    // An existing codes file is never overwritten.
    write(&codes, "precious\n")?;
    let stderr = dir.run_failing(&["device", "import", &s(&csv), "--codes", &s(&codes)])?;
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&codes)?, "precious\n");

    assert!(!devices(&dir)?.contains("imp-1"), "nothing registered");
    Ok(())
}
