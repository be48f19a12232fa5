//! What every service binary does at start: logging, and a shutdown flag raised by SIGINT/SIGTERM.
//! Services poll the flag in their loops (every loop has a bounded wait), finish what they hold,
//! and exit cleanly so owners can unlink their shared memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Starts logging to stderr. `RUST_LOG` overrides `level` (the config's `log_level`).
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Raised once when the service should stop. Cheap to clone and poll.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag raised by SIGINT or SIGTERM.
    pub fn on_signals() -> std::io::Result<Self> {
        let s = Self::new();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, Arc::clone(&s.0))?;
        }
        Ok(s)
    }

    pub fn trigger(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Logs each of the config's notices (keys accepted without effect) once, as a warning. Every
/// service calls it once at start, after [`init_logging`].
pub fn warn_notices(cfg: &crate::DetectorConfig) {
    for notice in &cfg.notices {
        tracing::warn!("{notice}");
    }
}
