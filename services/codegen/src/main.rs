//! `sluice-codegen [--check]`: regenerate the Rust code that is generated from
//! `schemas/` and checked in, so that a build needs no schema compiler.
//!
//! With `--check` it writes nothing and fails when the checked-in code differs
//! from what the schemas give (CI runs this). Needs the `capnp` compiler
//! (Debian package `capnproto`); `just schemas` installs it when missing.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

/// A schema and where its generated Rust lives, relative to the workspace root.
const CAPNP: &[(&str, &str)] = &[("schemas/batch.capnp", "services/model/src/generated/batch_capnp.rs")];

fn main() -> ExitCode {
    let check = std::env::args().skip(1).any(|a| a == "--check");
    match run(check) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-codegen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    // services/codegen -> workspace root
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(check: bool) -> anyhow::Result<()> {
    let root = workspace_root();
    let out = tempfile::tempdir().context("creating a scratch directory")?;
    let mut stale = Vec::new();
    for (schema, target) in CAPNP {
        capnpc::CompilerCommand::new()
            .src_prefix(root.join("schemas"))
            .file(root.join(schema))
            .output_path(out.path())
            .run()
            .with_context(|| format!("compiling {schema} (is the capnp compiler installed?)"))?;
        let name = Path::new(schema)
            .file_stem()
            .map(|s| format!("{}_capnp.rs", s.to_string_lossy()))
            .context("schema without a file name")?;
        let fresh = std::fs::read(out.path().join(&name)).with_context(|| format!("reading generated {name}"))?;
        let target_path = root.join(target);
        let current = std::fs::read(&target_path).unwrap_or_default();
        if fresh == current {
            continue;
        }
        if check {
            stale.push(*target);
        } else {
            if let Some(dir) = target_path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&target_path, fresh).with_context(|| format!("writing {target}"))?;
            eprintln!("sluice-codegen: regenerated {target}");
        }
    }
    if !stale.is_empty() {
        bail!("generated code is out of date: {} (run `just schemas`)", stale.join(", "));
    }
    Ok(())
}
