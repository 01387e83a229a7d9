//! `lb top`: a live view of a running agent, one sample per interval.
//!
//! Each sample reads the pinned counters twice, an interval apart ([`Snapshot::read_pinned`]),
//! and turns the differences into rates (`rates.rs`, pure); target health and the last
//! change come from the control API. The connection table's fill is counted on a
//! thread of its own (one key lookup per entry: a full table of 262,144 entries takes
//! a noticeable fraction of a second), at most once an interval and at most a tenth of
//! the time, so the screen never waits for it.
//!
//! On a terminal, the view is drawn with ratatui (`ui.rs`); `s` cycles the sort column,
//! `q`, Esc or Ctrl-C quit. When stdout is not a terminal it prints a plain table per
//! interval; `--json` prints one JSON object per interval; `--once` prints one sample
//! and exits.

pub mod rates;
pub mod ui;

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use crate::{
    api::{ApiError, Client},
    datapath::{
        DataplaneError,
        stats::{self, ConnFill, Snapshot},
    },
};
use rates::{ApiView, ConnTable, Sample, SortKey};

/// How long one connection-table count may take before it stops (a lower bound).
const CONN_COUNT_BUDGET: Duration = Duration::from_secs(2);
/// How long the control API may take to answer before a sample goes without it.
const API_TIMEOUT: Duration = Duration::from_millis(500);

/// What `lb top` shows and how.
#[derive(Debug, Clone)]
pub struct TopOptions {
    /// The agent's pin directory (`dataplane.pin_dir`).
    pub pin_dir: PathBuf,
    /// The agent's control socket (`control.socket`).
    pub socket: PathBuf,
    /// Time between the two reads of a sample (and between samples).
    pub interval: Duration,
    /// One sample, then exit.
    pub once: bool,
    /// JSON samples instead of tables.
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(
        "no running agent pins its maps under {}: start `lb run`, or pass the agent's `dataplane.pin_dir` with --pin-dir",
        dir.display()
    )]
    NoAgent { dir: PathBuf },
    #[error("reading the maps pinned under {}", dir.display())]
    Read {
        dir: PathBuf,
        #[source]
        source: DataplaneError,
    },
    #[error("--interval must be between 0.1 and 3600 seconds, not {secs}")]
    Interval { secs: f64 },
    #[error("the terminal")]
    Terminal {
        #[source]
        source: std::io::Error,
    },
    #[error("writing the output")]
    Output {
        #[source]
        source: std::io::Error,
    },
    #[error("encoding JSON")]
    Json {
        #[source]
        source: serde_json::Error,
    },
}

/// Runs `lb top` until `q` (terminal), until killed (plain or JSON stream), or for one
/// sample (`--once`).
pub fn run(opts: &TopOptions) -> Result<(), TopError> {
    let secs = opts.interval.as_secs_f64();
    if !(0.1..=3600.0).contains(&secs) {
        return Err(TopError::Interval { secs });
    }
    if !opts.pin_dir.join(lb_common::maps::VIPS).exists() {
        return Err(TopError::NoAgent { dir: opts.pin_dir.clone() });
    }
    let mut sampler = Sampler::new(opts)?;
    if opts.once {
        std::thread::sleep(opts.interval);
        let mut s = sampler.next(Some(CONN_COUNT_BUDGET))?;
        rates::sort(&mut s, SortKey::default());
        let text = if opts.json {
            serde_json::to_string_pretty(&s).map_err(|source| TopError::Json { source })? + "\n"
        } else {
            ui::plain(&s, SortKey::default())
        };
        return print(&text);
    }
    if !opts.json && std::io::stdout().is_terminal() {
        return interactive(opts, sampler);
    }
    sampler.start_conn_counter();
    loop {
        std::thread::sleep(opts.interval);
        let mut s = sampler.next(None)?;
        rates::sort(&mut s, SortKey::default());
        let text = if opts.json {
            serde_json::to_string(&s).map_err(|source| TopError::Json { source })? + "\n"
        } else {
            ui::plain(&s, SortKey::default()) + "\n"
        };
        print(&text)?;
    }
}

fn print(text: &str) -> Result<(), TopError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|source| TopError::Output { source })
}

/// The terminal view: draws a sample every interval, handles keys in between.
fn interactive(opts: &TopOptions, mut sampler: Sampler) -> Result<(), TopError> {
    sampler.start_conn_counter();
    // Restores the terminal on panics too.
    let mut terminal = ratatui::try_init().map_err(|source| TopError::Terminal { source })?;
    let outcome = (|| -> Result<(), TopError> {
        let mut key = SortKey::default();
        let mut shown: Option<Sample> = None;
        let mut error: Option<String> = None;
        let mut next = Instant::now() + opts.interval;
        loop {
            let draw = |f: &mut ratatui::Frame<'_>| ui::draw(f, shown.as_ref(), key, opts, error.as_deref());
            terminal.draw(draw).map_err(|source| TopError::Terminal { source })?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait).map_err(|source| TopError::Terminal { source })? {
                match event::read().map_err(|source| TopError::Terminal { source })? {
                    Event::Key(k) if k.kind != KeyEventKind::Release => match k.code {
                        KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                        KeyCode::Char('s') => {
                            key = key.next();
                            if let Some(s) = shown.as_mut() {
                                rates::sort(s, key);
                            }
                        }
                        _ => {}
                    },
                    _ => {} // a resize: drawn again at once
                }
                continue;
            }
            next = Instant::now() + opts.interval;
            // The agent may restart under `lb top`: a failed read is shown, and retried.
            match sampler.next(None) {
                Ok(mut s) => {
                    rates::sort(&mut s, key);
                    shown = Some(s);
                    error = None;
                }
                Err(e) => error = Some(chain(&e)),
            }
        }
    })();
    ratatui::restore();
    outcome
}

/// Reads samples: keeps the previous read, asks the control API, and shares the
/// connection-table count of its counting thread.
struct Sampler {
    pin_dir: PathBuf,
    client: Client,
    rt: tokio::runtime::Runtime,
    prev: (Snapshot, Instant),
    fill: Arc<Mutex<Option<(ConnFill, Instant)>>>,
    stop: Arc<AtomicBool>,
    interval: Duration,
}

impl Sampler {
    fn new(opts: &TopOptions) -> Result<Sampler, TopError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| TopError::Terminal { source })?;
        let first = read(&opts.pin_dir)?;
        Ok(Sampler {
            pin_dir: opts.pin_dir.clone(),
            client: Client::new(&opts.socket),
            rt,
            prev: (first, Instant::now()),
            fill: Arc::new(Mutex::new(None)),
            stop: Arc::new(AtomicBool::new(false)),
            interval: opts.interval,
        })
    }

    /// Starts the thread that counts the connection table.
    fn start_conn_counter(&self) {
        let (dir, fill, stop, interval) = (self.pin_dir.clone(), self.fill.clone(), self.stop.clone(), self.interval);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if let Ok(f) = stats::conn_fill_pinned(&dir, CONN_COUNT_BUDGET)
                    && let Ok(mut slot) = fill.lock()
                {
                    *slot = Some((f, Instant::now()));
                }
                // At most once an interval, and idle at least 9/10 of the time.
                let pause = interval.max(started.elapsed() * 9);
                let until = Instant::now() + pause;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50).min(pause));
                }
            }
        });
    }

    /// The sample from the previous read to now. With `count`, counts the connection
    /// table here (for `--once`) instead of using the counting thread's last count.
    fn next(&mut self, count: Option<Duration>) -> Result<Sample, TopError> {
        let cur = read(&self.pin_dir)?;
        let now = Instant::now();
        let secs = now.duration_since(self.prev.1).as_secs_f64();
        let api = self.api();
        let conn_table = match count {
            Some(budget) => {
                stats::conn_fill_pinned(&self.pin_dir, budget).ok().map(|fill| ConnTable { fill, age_secs: 0.0 })
            }
            None => self.fill.lock().ok().and_then(|slot| {
                slot.as_ref().map(|(fill, at)| ConnTable { fill: *fill, age_secs: at.elapsed().as_secs_f64() })
            }),
        };
        let s = rates::sample(&self.prev.0, &cur, secs, &api, conn_table);
        self.prev = (cur, now);
        Ok(s)
    }

    /// The agent's status and targets, or why not (within [`API_TIMEOUT`]).
    fn api(&self) -> ApiView {
        let calls = async {
            let status = self.client.status().await?;
            let targets = self.client.targets(None).await?;
            Ok::<_, ApiError>((status, targets))
        };
        match self.rt.block_on(async { tokio::time::timeout(API_TIMEOUT, calls).await }) {
            Ok(Ok((status, targets))) => ApiView { status: Some(status), targets: Some(targets.targets), error: None },
            Ok(Err(e)) => ApiView { error: Some(chain(&e)), ..ApiView::default() },
            Err(_) => ApiView {
                error: Some(format!("no answer within {} ms", API_TIMEOUT.as_millis())),
                ..ApiView::default()
            },
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read(dir: &Path) -> Result<Snapshot, TopError> {
    Snapshot::read_pinned(dir).map_err(|source| TopError::Read { dir: dir.to_path_buf(), source })
}

/// `e` and its sources, `: `-separated.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
