//! Standard output and error that never panic. `println!` panics when standard output is gone
//! (`strata report --format html | head -1`); here a closed pipe discards the rest of the output
//! quietly, so the command's work still finishes and the cache closes cleanly, and any other
//! write error is returned to the caller. `eprintln!` likewise panics when standard error is
//! gone (`strata … 2>&1 | head -1`); `errln!` drops what cannot be written.

use std::fmt::Arguments;
use std::io::{ErrorKind, Write};

/// Writes `args` to standard output; a closed pipe is not an error.
pub fn write(args: Arguments<'_>) -> std::io::Result<()> {
    match std::io::stdout().lock().write_fmt(args) {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `print!` through [`write`]: evaluates to `std::io::Result<()>`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*))
    };
}

/// `println!` through [`write`]: evaluates to `std::io::Result<()>`.
macro_rules! outln {
    () => {
        $crate::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprintln!` that never panics: with standard error gone there is nowhere to say more.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub(crate) use {errln, out, outln};
