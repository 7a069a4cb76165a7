//! Tables as JSON lines, in the exact format of `oracle.py`'s output:
//! one object a line, keys sorted, rows sorted by their key fields.

use std::io::Write;
use std::path::Path;

use sluice_model::table::{Table, write_row};

use crate::Sink;

/// Writing an export failed.
#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {source}")]
pub struct ExportError {
    path: String,
    #[source]
    source: std::io::Error,
}

/// Write every table to `dir/<table>.jsonl`; returns rows per table.
pub fn export(sink: &Sink, dir: &Path) -> Result<Vec<(Table, usize)>, ExportError> {
    let fail = |path: &Path| {
        let path = path.display().to_string();
        move |source| ExportError { path, source }
    };
    std::fs::create_dir_all(dir).map_err(fail(dir))?;
    let mut counts = Vec::new();
    for table in Table::ALL {
        let path = dir.join(format!("{}.jsonl", table.name()));
        let (text, rows) = render(sink, table);
        let tmp = path.with_extension("jsonl.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(fail(&tmp))?;
        f.write_all(text.as_bytes()).map_err(fail(&tmp))?;
        f.sync_all().map_err(fail(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(fail(&path))?;
        counts.push((table, rows));
    }
    Ok(counts)
}

/// `table` as JSON lines in oracle.py's format, and its number of rows.
pub fn render(sink: &Sink, table: Table) -> (String, usize) {
    let rows = sink.rows(table);
    let mut text = String::with_capacity(rows.len() * 160);
    for (k, v) in &rows {
        write_row(k, v, &mut text);
        text.push('\n');
    }
    (text, rows.len())
}
