//! Where a broker started with no options listens and keeps its data, so the CLI and
//! applications find it (and trust its development CA) with no flags.

use std::path::PathBuf;

/// The port `quiverd` listens on when given no `--listen`.
pub const DEFAULT_PORT: u16 = 7420;

/// `$HOME/.quiver/data` (or `./quiver-data` without a home): where `quiverd` keeps its data
/// by default, so the CLI finds the development CA at `<this>/tls/ca.pem` with no flags.
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join(".quiver").join("data"),
        _ => PathBuf::from("quiver-data"),
    }
}

/// The development CA a default `quiverd` generates: `<default_data_dir>/tls/ca.pem`.
pub fn default_ca_path() -> PathBuf {
    default_data_dir().join("tls").join("ca.pem")
}
