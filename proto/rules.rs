//! The formats the contract's comments state for names, labels, directive
//! types and metric identifiers, in one place: the hub enforces them, and
//! clients check them early to fail with a clear message before dialing.

/// Most labels on a spoke (or in a selector).
pub const MAX_LABELS: usize = 32;
/// Longest label value, in characters.
pub const MAX_LABEL_VALUE_CHARS: usize = 256;

/// A spoke name: 1 to 63 of `[a-z0-9._-]`, starting with a letter or digit.
pub fn is_spoke_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// A label key: 1 to 63 of `[A-Za-z0-9._/-]`.
pub fn is_label_key(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// A directive type: 1 to 64 of `[A-Za-z0-9_.\/-]`.
pub fn is_directive_type(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b))
}

/// A metric domain (`max` 64), name (`max` 128) or point label key (`max`
/// 64): 1 to `max` of `[A-Za-z0-9_.-]`, starting with a letter.
pub fn is_metric_ident(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Shortest key a spoke may propose (`RegisterRequest.proposed_key`).
pub const MIN_SPOKE_KEY_CHARS: usize = 32;
/// Longest key a spoke may propose.
pub const MAX_SPOKE_KEY_CHARS: usize = 128;

/// A key a spoke proposes for itself: 32 to 128 of `[A-Za-z0-9._~-]` (what
/// fits in `authorization: Bearer <key>` untouched; 64 hex characters, the
/// hub's own keys, qualify).
pub fn is_spoke_key(s: &str) -> bool {
    (MIN_SPOKE_KEY_CHARS..=MAX_SPOKE_KEY_CHARS).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_formats() {
        for ok in ["a", "billing-eu-1", "x.y_z", "0abc"] {
            assert!(is_spoke_name(ok), "{ok}");
        }
        for bad in ["", "-a", "Abc", "a b", "a<script>", &"a".repeat(64)] {
            assert!(!is_spoke_name(bad), "{bad}");
        }
        assert!(is_label_key("app.kubernetes.io/name") && !is_label_key("a b"));
        assert!(
            is_directive_type("sync_doc")
                && is_directive_type("ai/v2.task")
                && !is_directive_type("")
        );
        assert!(is_metric_ident("orders_total", 128) && !is_metric_ident("9lives", 64));
        assert!(is_spoke_key(&"ab12".repeat(16)) && is_spoke_key(&"A-_.~z".repeat(6)));
        for bad in [
            "",
            &"a".repeat(31),
            &"a".repeat(129),
            &format!("{} x", "a".repeat(40)),
        ] {
            assert!(!is_spoke_key(bad), "{bad}");
        }
    }
}
