//! Deleting a topic under running tails: they exit non-zero saying the topic was deleted, the
//! broker lets go of the deleted files, and a topic re-created under the name works.

use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");

fn run(broker: &BrokerProcess, args: &[&str]) -> anyhow::Result<Output> {
    let out = broker.cli(CLI).args(args).stdin(Stdio::null()).output()?;
    anyhow::ensure!(out.status.success(), "quiver {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(out)
}

/// Files under `dir` the process `pid` holds open although they were deleted.
fn deleted_files_held(pid: u32, dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let mut held = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else { continue };
        let target = target.to_string_lossy().into_owned();
        if target.starts_with(&*dir.to_string_lossy()) && target.ends_with("(deleted)") {
            held.push(target);
        }
    }
    Ok(held)
}

/// Waits (bounded) for a tail to exit; its output.
async fn exit_of(mut child: Child, within: Duration) -> anyhow::Result<Output> {
    let deadline = Instant::now() + within;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "tail still running {within:?} after the delete; stdout: {:?}, stderr: {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(child.wait_with_output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_ends_its_tails_and_closes_its_files() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        let pid = broker.pid().ok_or_else(|| anyhow::anyhow!("no broker pid"))?;
        run(&broker, &["topic", "create", "doomed", "--partitions", "2"])?;
        run(&broker, &["publish", "doomed", "a", "b", "c", "d"])?;

        // A plain tail and a group member, each having printed what is there.
        let tails: Vec<Child> = [
            &["tail", "doomed", "--from", "earliest"][..],
            &["tail", "doomed", "--from", "earliest", "--group", "g"],
        ]
        .iter()
        .map(|args| {
            broker
                .cli(CLI)
                .args(*args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
        // Both are subscribed once the group has a member and the topic has a reader; give
        // them a moment to print the 4 messages (they are checked after the exit).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // "unknown group" until the member joined.
            let out = broker.cli(CLI).args(["group", "describe", "g"]).stdin(Stdio::null()).output()?;
            if String::from_utf8_lossy(&out.stdout).contains("1 member(s)") {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the group tail never joined");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;

        run(&broker, &["topic", "delete", "doomed"])?;
        for tail in tails {
            let out = exit_of(tail, Duration::from_secs(15)).await?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "tail exited 0; stderr: {stderr}");
            assert_eq!(stderr.trim(), "error: topic 'doomed' was deleted");
            let mut printed: Vec<String> =
                String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
            printed.sort();
            assert_eq!(printed, ["a", "b", "c", "d"], "printed before the delete");
        }

        // The broker lets go of the deleted partitions' files.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let held = deleted_files_held(pid, dir.path())?;
            if held.is_empty() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the broker still holds deleted files: {held:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // A topic re-created under the name is a new, empty topic a new tail reads.
        run(&broker, &["topic", "create", "doomed", "--partitions", "1"])?;
        let tail = broker
            .cli(CLI)
            .args(["tail", "doomed", "--from", "earliest", "--count", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        run(&broker, &["publish", "doomed", "fresh"])?;
        let out = exit_of(tail, Duration::from_secs(15)).await?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "fresh\n");
        Ok(())
    })
    .await
}

/// A group member that holds no partition ends too when its topic is deleted (at its next
/// heartbeat: the broker dropped the group with the topic), with the same final error as the
/// member that held the partition, and never moves to a topic re-created under the name; a
/// new member of the group reads the new topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_ends_idle_group_members() -> anyhow::Result<()> {
    init_tracing();
    bounded(180, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        run(&broker, &["topic", "create", "z", "--partitions", "1"])?;
        run(&broker, &["publish", "z", "1", "2", "3"])?;
        let describe = || -> anyhow::Result<Output> {
            Ok(broker.cli(CLI).args(["group", "describe", "gz"]).stdin(Stdio::null()).output()?)
        };

        // Two members of a 1-partition topic: one holds it, the other is idle.
        let mut tails = Vec::new();
        for members in ["1 member(s)", "2 member(s)"] {
            tails.push(
                broker
                    .cli(CLI)
                    .args(["tail", "z", "--from", "earliest", "--group", "gz"])
                    .args(["--session-timeout-ms", "1500"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()?,
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while !String::from_utf8_lossy(&describe()?.stdout).contains(members) {
                anyhow::ensure!(Instant::now() < deadline, "the group never had {members}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;

        run(&broker, &["topic", "delete", "z"])?;
        let mut printed = Vec::new();
        for tail in tails {
            // Heartbeats every 0.5 s: well within this.
            let out = exit_of(tail, Duration::from_secs(15)).await?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "tail exited 0; stderr: {stderr}");
            assert_eq!(stderr.trim(), "error: topic 'z' was deleted");
            printed.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string));
        }
        printed.sort();
        assert_eq!(
            printed,
            ["1", "2", "3"],
            "printed before the delete, by the member holding the partition"
        );

        // The group went with the topic: describe says so in one line, no half table.
        let out = describe()?;
        assert!(!out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "", "no table for a group that is gone");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains("gz"), "{stderr}");

        // Re-created, the name is a new topic; a new member of the group reads it.
        run(&broker, &["topic", "create", "z", "--partitions", "1"])?;
        let tail = broker
            .cli(CLI)
            .args(["tail", "z", "--from", "earliest", "--group", "gz", "--count", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        run(&broker, &["publish", "z", "fresh"])?;
        let out = exit_of(tail, Duration::from_secs(15)).await?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "fresh\n");
        Ok(())
    })
    .await
}
