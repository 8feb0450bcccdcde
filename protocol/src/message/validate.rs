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
        return Err(format!("topic name has '{c}'; allowed are letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Group names: 1..=MAX_GROUP_NAME_BYTES bytes.
pub fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > crate::limits::MAX_GROUP_NAME_BYTES {
        return Err(format!("group name must be 1 to {} bytes", crate::limits::MAX_GROUP_NAME_BYTES));
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
