//! Tables for people, JSON for scripts.

use serde::Serialize;

use super::Output;

/// Prints `value` as JSON, or the table made by `table`.
pub fn print<T: Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> Table) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).expect("views serialize")),
        Output::Table => print!("{}", table(value).render()),
    }
}

/// Left-aligned columns separated by two spaces.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { rows: vec![header.iter().map(|h| h.to_uppercase()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| self.rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let line: Vec<String> =
                row.iter().enumerate().map(|(i, cell)| format!("{cell:<w$}", w = widths[i])).collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// Key-value lines for one object.
pub fn pairs(pairs: &[(&str, String)]) -> Table {
    let mut t = Table { rows: Vec::new() };
    for (k, v) in pairs {
        t.row(vec![format!("{k}:"), v.clone()]);
    }
    t
}
