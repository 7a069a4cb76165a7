//! Exactly-once in embedded mode, with real processes: `sluice run` is
//! SIGKILLed at pseudo-random moments (many commits a second, so kills land
//! before, during and after commits), restarted on the same state each time,
//! and finally run to the end. Its tables must be byte-identical to those of
//! a run that was never interrupted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sluice() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env("SLUICE_STATE__COMMIT_INTERVAL", "15ms").stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// `sluice run` slowed on purpose (`source.chunk_pause`): 64 KiB chunks with a
/// 20 ms pause each make the sample's input last several seconds on any
/// machine, so every signal below lands mid-input.
fn slow_run(data: &Path, state: &Path) -> Command {
    let mut cmd = sluice();
    cmd.env("SLUICE_SOURCE__CHUNK_BYTES", "65536").env("SLUICE_SOURCE__CHUNK_PAUSE", "20ms");
    cmd.args(["run", "--data", path(data), "--state", path(state)]);
    cmd
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn run_to_end(data: &Path, state: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let out = sluice().args(["run", "--data", path(data), "--state", path(state)]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    Ok(text)
}

fn export(state: &Path, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let o = sluice().args(["export", "--state", path(state), "--out", path(out)]).output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

/// A sample of 250,000 uploads in `dir/data` and, in `dir/want`, the tables
/// of an uninterrupted run over it.
fn sample_and_reference(dir: &Path, seed: u64) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    sluice_cli::sample::write_sample(&data, seed, 250_000)?;
    run_to_end(&data, &dir.join("reference"))?;
    export(&dir.join("reference"), &dir.join("want"))?;
    Ok(data)
}

/// Every table in `dir/got` byte-identical to `dir/want`.
fn assert_same_tables(dir: &Path, after: &str) -> Result<(), Box<dyn std::error::Error>> {
    for table in ["daily", "sessions_per_device", "custom_events", "minute", "rejects"] {
        let name = format!("{table}.jsonl");
        let want = std::fs::read(dir.join("want").join(&name))?;
        let got = std::fs::read(dir.join("got").join(&name))?;
        assert!(want == got, "{table} differs {after}");
    }
    Ok(())
}

#[test]
fn sigkill_at_random_moments_leaves_exact_tables() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let data = sample_and_reference(dir.path(), 11)?;

    let state = dir.path().join("killed");
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    let (mut killed_while_running, mut restarts) = (0, 0);
    for _ in 0..12 {
        // xorshift: a fixed, reproducible sequence of kill delays, 10-160 ms.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(10 + rng % 150);
        let mut child = slow_run(&data, &state).spawn()?;
        let started = Instant::now();
        while started.elapsed() < delay {
            if child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if child.try_wait()?.is_none() {
            child.kill()?; // SIGKILL
            killed_while_running += 1;
        }
        child.wait()?;
        restarts += 1;
    }
    let last = run_to_end(&data, &state)?;
    assert_eq!(killed_while_running, restarts, "every kill hits a running process (the input is slowed)");
    assert!(last.contains("resumed after line"), "the last run resumes from a commit: {last}");

    export(&state, &dir.path().join("got"))?;
    assert_same_tables(dir.path(), &format!("after {killed_while_running} kills"))?;
    Ok(())
}

#[test]
fn sigterm_stops_commits_and_exits_zero() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let data = sample_and_reference(dir.path(), 12)?;

    let state = dir.path().join("stopped");
    let child = slow_run(&data, &state).spawn()?;
    // Signal once the state is open; the slowed input lasts seconds more.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !state.join("db").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    assert!(status.success(), "sending SIGTERM");
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "SIGTERM exits 0: {text}");
    assert!(text.contains("stopped by a signal"), "the stop landed before the end of the input: {text}");

    let last = run_to_end(&data, &state)?;
    assert!(last.contains("resumed after line"), "{last}");
    export(&state, &dir.path().join("got"))?;
    assert_same_tables(dir.path(), "after a SIGTERM and a restart")?;
    Ok(())
}
