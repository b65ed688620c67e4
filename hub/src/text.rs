//! How the hub words counts for people, in logs, audit reasons and command output.

/// `n` and the noun, singular for one: "1 group", "3 groups".
pub fn counted(n: impl Into<u64>, one: &str, many: &str) -> String {
    match n.into() {
        1 => format!("1 {one}"),
        n => format!("{n} {many}"),
    }
}

#[cfg(test)]
mod tests {
    use super::counted;

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(counted(1u64, "entry", "entries"), "1 entry");
        assert_eq!(counted(0u64, "entry", "entries"), "0 entries");
        assert_eq!(counted(2u32, "device", "devices"), "2 devices");
    }
}
