//! `quiver tail --from time:<when>` as a user types it: an RFC 3339 time, a relative time,
//! epoch milliseconds; and epoch seconds (`$(date +%s)`) refused instead of replaying the topic.

use std::process::{Output, Stdio};
use std::time::Duration;

use quiver_tests::{bounded, init_tracing, BrokerProcess};

const BROKER: &str = env!("CARGO_BIN_EXE_quiverd-under-test");
const CLI: &str = env!("CARGO_BIN_EXE_quiver-under-test");

fn quiver(broker: &BrokerProcess, args: &[&str]) -> anyhow::Result<Output> {
    Ok(broker.cli(CLI).args(args).stdin(Stdio::null()).output()?)
}

fn ok(out: Output) -> anyhow::Result<String> {
    anyhow::ensure!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_from_a_time() -> anyhow::Result<()> {
    init_tracing();
    bounded(120, async {
        let dir = tempfile::tempdir()?;
        let broker = BrokerProcess::start(BROKER, dir.path(), None).await?;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            ok(quiver(&broker, &["topic", "create", "t", "--partitions", "1"])?)?;
            ok(quiver(&broker, &["publish", "t", "old"])?)?;
            std::thread::sleep(Duration::from_millis(1100));
            let boundary = time::OffsetDateTime::now_utc();
            std::thread::sleep(Duration::from_millis(50));
            ok(quiver(&broker, &["publish", "t", "new"])?)?;

            let first_from = |from: &str| -> anyhow::Result<String> {
                ok(quiver(&broker, &["tail", "t", "--from", from, "--count", "1"])?)
            };
            let rfc3339 = boundary.format(&time::format_description::well_known::Rfc3339)?;
            assert_eq!(first_from(&format!("time:{rfc3339}"))?, "new\n", "from {rfc3339}");
            let ms = boundary.unix_timestamp_nanos() / 1_000_000;
            assert_eq!(first_from(&format!("time:{ms}"))?, "new\n");
            assert_eq!(first_from("time:-1h")?, "old\n");

            // Seconds, as `$(date +%s)` gives them: refused, not read as 1970.
            let seconds = boundary.unix_timestamp();
            for args in [
                vec![
                    "tail".to_string(),
                    "t".into(),
                    "--from".into(),
                    format!("time:{seconds}"),
                    "--count".into(),
                    "1".into(),
                ],
                vec![
                    "group".to_string(),
                    "reset-offsets".into(),
                    "g".into(),
                    "--topic".into(),
                    "t".into(),
                    "--to".into(),
                    format!("time:{seconds}"),
                ],
            ] {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = quiver(&broker, &args)?;
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{args:?} was accepted");
                assert_eq!(err.trim().lines().count(), 1, "{err}");
                assert!(err.contains("looks like seconds"), "{err}");
                assert!(err.contains(&format!("time:{seconds}000")), "{err}");
            }
            Ok(())
        })
        .await?
    })
    .await
}
