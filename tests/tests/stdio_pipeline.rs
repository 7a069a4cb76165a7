//! The four stage binaries' stdio transport: `sluice-source | sluice-enrich |
//! sluice-window | sluice-sink`. Each stage's `pipe::run` (what its binary's
//! `main` calls) is joined to the next through the Cap'n Proto frames it
//! writes, so every batch crosses the wire codec; the tables must equal
//! oracle.py's.

use sluice_enrich::dimensions::DimensionTables;
use sluice_tests::{DataSet, assert_tables_equal, scratch};

#[test]
fn four_stages_over_framed_capnp_equal_oracle() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let work = scratch()?;

    let mut raw = Vec::new();
    let mut source = sluice_source::pipe::PipeSettings::default();
    source.source.chunk_bytes = 64 * 1024; // many frames, several per key group
    let meter = sluice_source::pipe::run(&source, std::fs::File::open(set.input())?, &mut raw)?;
    assert_eq!(meter.records_in, 20_000);

    let mut enriched = Vec::new();
    let tables = DimensionTables::load(&set.data())?;
    sluice_enrich::pipe::run(&Default::default(), tables, &raw[..], &mut enriched)?;

    let mut rows = Vec::new();
    // Emit often: the sink must keep only the newest version of each partial.
    sluice_window::pipe::run(7, &enriched[..], &mut rows)?;

    let (sink, meter) = sluice_sink::pipe::run(&Default::default(), &work.path().join("state"), &rows[..])?;
    assert!(meter.batches_in > 0);
    sluice_sink::export::export(&sink, &work.path().join("out"))?;
    assert_tables_equal(&set.expected(), &work.path().join("out"))?;

    // Replaying the whole row stream into the same sink changes nothing.
    let mut sink = sink;
    let mut stream = &rows[..];
    while let Some(frame) = sluice_runtime::frame::read_frame(&mut stream)? {
        use sluice_runtime::stage::Stage;
        sink.batch(sluice_runtime::codec::decode_rows(&frame)?, &mut Vec::new())?;
    }
    sluice_sink::export::export(&sink, &work.path().join("again"))?;
    assert_tables_equal(&set.expected(), &work.path().join("again"))?;

    // A second pipe into the same state is refused: its versions start over.
    match sluice_sink::pipe::run(&Default::default(), &work.path().join("state"), &rows[..]) {
        Ok(_) => anyhow::bail!("an earlier pipe's state must be refused"),
        Err(err) => assert!(format!("{err:#}").contains("fresh --state"), "{err:#}"),
    }
    Ok(())
}

#[test]
fn a_truncated_stream_is_an_error_not_a_shorter_input() -> anyhow::Result<()> {
    let set = DataSet::small()?;
    let mut raw = Vec::new();
    sluice_source::pipe::run(&Default::default(), std::fs::File::open(set.input())?, &mut raw)?;
    raw.truncate(raw.len() - 3);
    let tables = DimensionTables::load(&set.data())?;
    let err = sluice_enrich::pipe::run(&Default::default(), tables, &raw[..], &mut Vec::new())
        .expect_err("a cut frame must fail the stage");
    assert!(format!("{err:#}").contains("inside a frame"), "{err:#}");
    Ok(())
}
