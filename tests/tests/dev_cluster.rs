//! `quiverd dev-cluster`: three brokers as child processes that form a cluster the CLI reaches,
//! and that stop when the supervisor is killed with SIGKILL instead of running on unattended.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quiver_tests::{bounded, init_tracing};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");

/// The pids of `parent`'s children, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent)
        })
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next());
    matches!(state, Some(s) if s != "Z" && s != "X")
}

/// A base port whose next three UDP ports are free on loopback now.
fn free_base_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let base = quiver_tests::free_udp_port().saturating_sub(1);
        let free = (1..=3).all(|i| std::net::UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if base > 1024 && free {
            return Ok(base);
        }
    }
    anyhow::bail!("no three consecutive free UDP ports")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_serves_and_its_brokers_stop_when_it_is_killed() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let base = free_base_port()?;
        let mut supervisor = Command::new(BROKER)
            .args(["dev-cluster", "--nodes", "3", "--base-port", &base.to_string(), "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let brokers = (1..=3).map(|i| format!("127.0.0.1:{}", base + i)).collect::<Vec<_>>().join(",");
        let ca = dir.path().join("ca").join("ca.pem");
        // The CLI, pointed as dev-cluster says, sees three brokers up.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = Command::new(CLI)
                .args(["--broker", &brokers, "--ca"])
                .arg(&ca)
                .args(["cluster", "status", "--json"])
                .output()?;
            let up = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .map(|v| v["brokers"].as_array().map_or(0, |b| b.iter().filter(|b| b["up"] == true).count()));
            if up == Some(3) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "dev-cluster never served three brokers: {out:?}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let children = children_of(supervisor.id());
        assert_eq!(children.len(), 3, "three broker processes: {children:?}");
        supervisor.kill()?; // SIGKILL: no chance to stop them itself
        supervisor.wait()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while children.iter().any(|&c| running(c)) {
            anyhow::ensure!(Instant::now() < deadline, "brokers outlived their supervisor: {children:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    })
    .await
}
