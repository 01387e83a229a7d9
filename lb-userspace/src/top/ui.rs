//! How `lb top` shows a sample: the terminal view (ratatui) and the plain text printed
//! when stdout is not a terminal. Both fit 80 columns; the terminal view fits 24 rows
//! (tables show the first rows that fit, in the sort order).

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Modifier, Style},
    text::Line,
    widgets::{Cell, Paragraph, Row, Table},
};

use super::{
    TopOptions,
    rates::{Sample, SortKey},
};

/// `v` with an SI suffix, 3 significant digits: `0`, `999`, `1.23k`, `45.6M`.
pub fn si(v: f64) -> String {
    let (v, unit) = match v.abs() {
        a if a >= 1e12 => (v / 1e12, "T"),
        a if a >= 1e9 => (v / 1e9, "G"),
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e3 => (v / 1e3, "k"),
        _ => return format!("{v:.0}"),
    };
    if v.abs() >= 100.0 {
        format!("{v:.0}{unit}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.2}{unit}")
    }
}

/// The header lines (agent, global rates, last change), without styling.
fn header(s: &Sample, key: SortKey) -> Vec<String> {
    let agent = match &s.agent {
        Some(a) => format!("agent pid {} up {} s", a.pid, a.uptime_secs),
        None => "agent: control API unavailable".to_string(),
    };
    let table = match &s.conn_table {
        Some(t) => {
            let pct = if t.fill.capacity > 0 { t.fill.entries as f64 * 100.0 / t.fill.capacity as f64 } else { 0.0 };
            let more = if t.fill.complete { "" } else { "+" };
            format!("{}{more}/{} ({pct:.1}%)", si(t.fill.entries as f64), si(t.fill.capacity as f64))
        }
        None => "counting".to_string(),
    };
    let change = match s.agent.as_ref().and_then(|a| a.last_change.as_ref()) {
        Some(c) => format!("last change {:.0} s ago: {}", c.secs_ago, c.change),
        None => "last change: none since the agent started".to_string(),
    };
    let update = match s.agent.as_ref().and_then(|a| a.last_datapath_update_ms) {
        Some(ms) => format!(", in datapath in {ms:.2} ms"),
        None => String::new(),
    };
    vec![
        format!("lb top  {agent}  every {:.1} s  sort: {} (s)  q: quit", s.interval_secs, key.label()),
        format!(
            "rx {}/s  new flows {}/s  conn hit {}/s miss {}/s  table {table}",
            si(s.rx_per_sec),
            si(s.new_flows_per_sec),
            si(s.conn_hits_per_sec),
            si(s.conn_misses_per_sec)
        ),
        format!("{change}{update}"),
    ]
}

fn vip_cells(s: &Sample) -> Vec<[String; 5]> {
    s.vips
        .iter()
        .map(|v| {
            [
                v.listener.clone().unwrap_or_else(|| "-".into()),
                v.vip.clone(),
                si(v.packets_per_sec),
                si(v.bits_per_sec),
                si(v.packets as f64),
            ]
        })
        .collect()
}

fn target_cells(s: &Sample) -> Vec<[String; 6]> {
    s.targets
        .iter()
        .map(|t| {
            [
                t.group.clone().unwrap_or_else(|| "-".into()),
                t.target.to_string(),
                t.state.clone().unwrap_or_else(|| "?".into()),
                t.weight.map(|w| w.to_string()).unwrap_or_else(|| "-".into()),
                si(t.packets_per_sec),
                si(t.bits_per_sec),
            ]
        })
        .collect()
}

/// `reason rate/s` for every drop reason, without the `drop_` prefix.
fn drop_cells(s: &Sample) -> Vec<String> {
    s.drops.iter().map(|d| format!("{:<18}{:>6}", d.reason.trim_start_matches("drop_"), si(d.per_sec))).collect()
}

const VIP_HEAD: [&str; 5] = ["LISTENER", "VIP", "PKT/S", "BIT/S", "PACKETS"];
const TARGET_HEAD: [&str; 6] = ["GROUP", "TARGET", "STATE", "W", "PKT/S", "BIT/S"];
/// Drop reasons per line.
const DROPS_PER_LINE: usize = 3;

/// The sample as plain text (stdout not a terminal, or `--once`).
pub fn plain(s: &Sample, key: SortKey) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for line in header(s, key) {
        let _ = writeln!(out, "{line}");
    }
    if let Some(e) = &s.api_error {
        let _ = writeln!(out, "control API: {e}");
    }
    let _ = writeln!(
        out,
        "{:<12} {:<32} {:>8} {:>8} {:>10}",
        VIP_HEAD[0], VIP_HEAD[1], VIP_HEAD[2], VIP_HEAD[3], VIP_HEAD[4]
    );
    for [l, v, p, b, t] in vip_cells(s) {
        let _ = writeln!(out, "{l:<12} {v:<32} {p:>8} {b:>8} {t:>10}");
    }
    let h = TARGET_HEAD;
    let _ = writeln!(out, "{:<12} {:<28} {:<10} {:>4} {:>8} {:>8}", h[0], h[1], h[2], h[3], h[4], h[5]);
    for [g, t, st, w, p, b] in target_cells(s) {
        let _ = writeln!(out, "{g:<12} {t:<28} {st:<10} {w:>4} {p:>8} {b:>8}");
    }
    let _ = writeln!(out, "DROPS/S");
    for chunk in drop_cells(s).chunks(DROPS_PER_LINE) {
        let _ = writeln!(out, "{}", chunk.join("  "));
    }
    out
}

/// Draws the terminal view: `sample` (none yet: a waiting line), or `error` above it.
pub fn draw(f: &mut Frame<'_>, sample: Option<&Sample>, key: SortKey, opts: &TopOptions, error: Option<&str>) {
    let area = f.area();
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let Some(s) = sample else {
        let text = format!(
            "lb top: first sample in {:.1} s (pins {}, socket {})  q: quit",
            opts.interval.as_secs_f64(),
            opts.pin_dir.display(),
            opts.socket.display()
        );
        f.render_widget(Paragraph::new(text), area);
        return;
    };
    let drops = drop_cells(s);
    let drop_lines = drops.len().div_ceil(DROPS_PER_LINE) as u16;
    let notice = s.api_error.as_ref().map(|e| format!("control API: {e}")).or(error.map(|e| format!("error: {e}")));
    let head_h = 3 + u16::from(notice.is_some());
    let rest = area.height.saturating_sub(head_h + drop_lines + 1);
    // VIPs get what they need up to half the rest; targets the remainder.
    let vip_h = (s.vips.len() as u16 + 2).min((rest / 2).max(3));
    let [head, vips, targets, drops_area] = Layout::vertical([
        Constraint::Length(head_h),
        Constraint::Length(vip_h),
        Constraint::Min(3),
        Constraint::Length(drop_lines + 1),
    ])
    .areas(area);

    let mut lines: Vec<Line<'_>> = header(s, key).into_iter().map(Line::from).collect();
    lines[0] = Line::styled(lines[0].to_string(), bold);
    if let Some(n) = notice {
        lines.push(Line::styled(n, Style::default().add_modifier(Modifier::REVERSED)));
    }
    f.render_widget(Paragraph::new(lines), head);

    let vip_rows = vip_cells(s).into_iter().map(|c| row(c, 2));
    let vip_table = Table::new(
        vip_rows,
        [
            Constraint::Length(10),
            Constraint::Fill(1),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(9),
        ],
    )
    .header(Row::new(VIP_HEAD).style(bold));
    f.render_widget(vip_table, pad_top(vips));

    let target_rows = target_cells(s).into_iter().map(|c| row(c, 3));
    let target_table = Table::new(
        target_rows,
        [
            Constraint::Length(10),
            Constraint::Fill(1),
            Constraint::Length(10),
            Constraint::Length(4),
            Constraint::Length(8),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(TARGET_HEAD).style(bold));
    f.render_widget(target_table, pad_top(targets));

    let mut lines = vec![Line::styled("DROPS/S", bold)];
    lines.extend(drops.chunks(DROPS_PER_LINE).map(|c| Line::from(c.join("  "))));
    f.render_widget(Paragraph::new(lines), drops_area);
}

/// A table row whose cells from `numbers_from` on are numbers: right-aligned.
fn row<const N: usize>(cells: [String; N], numbers_from: usize) -> Row<'static> {
    Row::new(
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| if i >= numbers_from { Cell::from(Line::from(c).right_aligned()) } else { Cell::from(c) }),
    )
}

/// `r` without its first row (a blank line between blocks).
fn pad_top(r: Rect) -> Rect {
    Rect { y: r.y + 1.min(r.height), height: r.height.saturating_sub(1), ..r }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_suffixes() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(999.4), "999");
        assert_eq!(si(1_234.0), "1.23k");
        assert_eq!(si(45_600_000.0), "45.6M");
        assert_eq!(si(262_144.0), "262k");
        assert_eq!(si(9.87e9), "9.87G");
    }
}
