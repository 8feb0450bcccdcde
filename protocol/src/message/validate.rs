//! Checks of names and counts against their limits.

use crate::limits::{MAX_PARTITIONS, MAX_TOPIC_NAME_BYTES};

/// Topic names: 1..=249 bytes of `[A-Za-z0-9._-]`, not `.` or `..`, as in Kafka.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOPIC_NAME_BYTES {
        return Err(format!("topic name must be 1 to {MAX_TOPIC_NAME_BYTES} bytes"));
    }
    if name == "." || name == ".." {
        return Err("topic name cannot be '.' or '..'".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("topic name has {c:?}; allowed are letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Group names: 1..=MAX_GROUP_NAME_BYTES bytes, no control characters (a tab or a newline
/// would break every line-oriented listing of groups, `quiver group list` among them).
pub fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > crate::limits::MAX_GROUP_NAME_BYTES {
        return Err(format!("group name must be 1 to {} bytes", crate::limits::MAX_GROUP_NAME_BYTES));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("group name has the control character {:?}; names are printable text", c));
    }
    Ok(())
}

/// A principal name (a certificate's common name, a token's owner, an ACL rule's subject):
/// 1 to `MAX_PRINCIPAL_BYTES` bytes, no blanks or control characters (token files and
/// listings are whitespace-separated), not `*` (which ACL rules use for anyone).
pub fn validate_principal(name: &str) -> Result<(), String> {
    let max = crate::limits::MAX_PRINCIPAL_BYTES;
    if name.is_empty() || name.len() > max {
        return Err(format!("a principal name has 1 to {max} bytes"));
    }
    if name == "*" || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "principal '{}': no blanks, control characters, or '*' alone",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// Partition counts: 1..=MAX_PARTITIONS.
pub fn validate_partition_count(n: u32) -> Result<(), String> {
    if n == 0 || n > MAX_PARTITIONS {
        return Err(format!("partition count must be 1 to {MAX_PARTITIONS}, got {n}"));
    }
    Ok(())
}

pub(super) fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_names_are_printable_text_of_bounded_length() {
        assert!(validate_group_name("billing").is_ok());
        assert!(validate_group_name("équipe één / 2").is_ok(), "any printable text");
        for bad in ["", "a\tb", "line\nbreak", "nul\0", "esc\u{1b}[31m"] {
            assert!(validate_group_name(bad).is_err(), "{bad:?}");
        }
        let long = "g".repeat(crate::limits::MAX_GROUP_NAME_BYTES + 1);
        assert!(validate_group_name(&long).is_err());
        let err = validate_group_name("a\tb").unwrap_err();
        assert!(err.contains("control character '\\t'"), "{err}");
    }
}
