//! Log lines on stderr (the serial console in a VM), each prefixed with
//! `somna-guest:` so the host can pick them out of the console tail.
//!
//! The format is deliberately terse (no timestamps, no targets): the console
//! is a slow emulated UART and the host keeps only its tail.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber. `filter` is a tracing filter. A bare
/// level (`debug`) applies to the agent's own events only, with the libraries
/// (hyper, h2: a line per frame at debug) kept at `warn`, so the console
/// stays readable; full directives (`h2=debug,info`) are used as given. An
/// invalid filter falls back to `info` (and says so).
pub fn init(filter: &str) {
    let directives = if filter.contains('=') || filter.contains(',') {
        filter.to_string()
    } else {
        format!("warn,{}={filter}", env!("CARGO_CRATE_NAME"))
    };
    let (filter, bad) = match EnvFilter::try_new(&directives) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new(format!("warn,{}=info", env!("CARGO_CRATE_NAME"))),
            Some(e),
        ),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(Prefixed)
        .try_init();
    if let Some(e) = bad {
        tracing::warn!("invalid log filter ({e}); using \"info\"");
    }
}

struct Prefixed;

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "somna-guest: ")?;
        match *event.metadata().level() {
            Level::INFO => {}
            Level::WARN => write!(writer, "warning: ")?,
            Level::ERROR => write!(writer, "error: ")?,
            Level::DEBUG => write!(writer, "debug: ")?,
            Level::TRACE => write!(writer, "trace: ")?,
        }
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
