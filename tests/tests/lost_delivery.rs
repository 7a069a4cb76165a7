//! A delivery lost in transit with nothing after it on its key group: the
//! server counts it as delivered and would send it again only after
//! `nats.ack_wait` (5 minutes). The stage's intake, idle, asks the server
//! how far each consumer delivered, finds it ahead of what arrived at two
//! probes in a row, and restarts its consumers: the record arrives within
//! seconds.

use std::time::{Duration, Instant};

use anyhow::ensure;
use sluice_tests::proxy::Fault;
use sluice_tests::stack::{Stack, StackConfig};
use sluice_tests::{DataSet, assert_tables_equal, scratch};

#[test]
fn a_lost_last_delivery_comes_again_within_seconds() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let dir = scratch()?;
    let mut config = StackConfig::new(&dir.path().join("stack"), &set.data());
    config.links = true;
    config.env.push(("SLUICE_NATS__DELIVERY_PROBE_INTERVAL".into(), "1s".into()));
    let mut stack = Stack::start(config)?;
    let total = std::fs::read_to_string(set.input())?.lines().count() as u64;
    let mut producer = stack.spawn_producer(&set.data(), 0, 0..total - 1)?;
    ensure!(producer.wait()?.success(), "sluice produce failed");
    stack.wait_for_sink(total - 1, Duration::from_secs(300))?;

    // enrich's link holds what the server sends it: the last record's batch,
    // delivered to enrich's waiting pull request, stops in the link, which
    // is then cut: the bytes are gone, the server counts them delivered.
    std::thread::sleep(Duration::from_secs(1));
    let link = |stack: &Stack, fault| {
        if let Some(l) = stack.links.get("enrich-0") {
            l.set(fault);
        }
    };
    link(&stack, Fault::Blackhole);
    let mut producer = stack.spawn_producer(&set.data(), 0, total - 1..total)?;
    ensure!(producer.wait()?.success(), "sluice produce failed");
    std::thread::sleep(Duration::from_secs(2));
    link(&stack, Fault::Cut);
    std::thread::sleep(Duration::from_millis(300));
    link(&stack, Fault::None);

    // A stage that finds a delivery missing stops; the supervisor restarts it.
    let started = Instant::now();
    let mut restarts = 0;
    while stack.covered() < total {
        if let Some(p) = stack.processes.iter_mut().find(|p| p.name == "enrich-0")
            && p.child.try_wait()?.is_some()
        {
            restarts += 1;
            stack.restart_service("enrich-0")?;
        }
        if let Some(dead) = stack.exited()? {
            anyhow::bail!("{dead}");
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the last record did not arrive within 60 s (covered {} of {total}); logs in {}",
            stack.covered(),
            dir.path().join("stack").join("logs").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "the lost delivery arrived {:.1}s after the cut; enrich restarted {restarts} times",
        started.elapsed().as_secs_f64()
    );
    let got = dir.path().join("got");
    stack.export(&got)?;
    stack.stop()?;
    assert_tables_equal(&set.expected(), &got)
}
