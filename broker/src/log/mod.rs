//! Partition logs (being written).
