//! Exit codes, documented in `--help` and README, and the failure that carries one.

use std::process::ExitCode;

/// Shown after `--help`.
pub(crate) const HELP: &str = "Exit codes:
  0  done
  1  internal error (cannot write output, cannot start)
  2  usage error (unknown command or option, bad --timeout)
  3  configuration error (file missing or invalid: the message names the field;
     or a bad TOKIO_WORKER_THREADS)
  4  the shared store could not be read or written (the message names the cause:
     connection refused, authentication, DNS, TLS, timeout, protocol, script)
  5  refused: the command cannot work with this configuration (force without [redis],
     force on a target neither configured nor known: use --create if that is meant;
     status NAME with a name neither configured nor known)
  6  status printed everything it could, but some entries could not be read (each is
     marked in the listing with what is wrong, e.g. a stray key of the wrong type)";

/// Why the command failed, and with which exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    message: String,
    /// The store error's stable name (`auth`, `refused`, `timeout`, ...), for `--json`.
    cause: Option<&'static str>,
}

impl Failure {
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
            cause: None,
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
            cause: None,
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Failure {
            code: 3,
            message: message.into(),
            cause: None,
        }
    }

    pub(crate) fn store(message: impl Into<String>) -> Self {
        Failure {
            code: 4,
            message: message.into(),
            cause: None,
        }
    }

    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Failure {
            code: 5,
            message: message.into(),
            cause: None,
        }
    }

    /// Everything was printed (with `--json`, as JSON), but some entries could not be read.
    pub(crate) fn partial(message: impl Into<String>) -> Self {
        Failure {
            code: 6,
            message: message.into(),
            cause: None,
        }
    }

    /// A store call timed out.
    pub(crate) fn is_timeout(&self) -> bool {
        self.cause == Some("timeout")
    }

    /// The shared store could not be read or written (exit 4).
    pub(crate) fn is_store(&self) -> bool {
        self.code == 4
    }

    /// What went wrong.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The JSON error object `--json` prints.
    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "exit_code": self.code,
                "cause": self.cause,
                "message": self.message,
            }
        })
    }

    /// The message with `note` appended.
    pub(crate) fn noting(mut self, note: &str) -> Self {
        self.message.push_str(note);
        self
    }

    /// Sorts a library error: store failures exit 4, configuration errors 3.
    pub(crate) fn from_error(context: &str, e: fusebox::Error) -> Self {
        let message = format!("{context}: {e}");
        match e {
            fusebox::Error::Store(e) => Failure {
                cause: Some(e.kind()),
                ..Failure::store(message)
            },
            fusebox::Error::Config { .. } | fusebox::Error::UnknownFeature(_) => {
                Failure::config(message)
            }
            fusebox::Error::UnknownTarget(_) => Failure::refused(message),
            _ => Failure::internal(message),
        }
    }

    /// Prints the message to stderr (and, with `--json`, an error object to stdout) and
    /// returns the exit code.
    pub(crate) fn report(self, json: bool) -> ExitCode {
        eprintln!("fusebox: {}", self.message);
        // A partial listing already printed its JSON document: no second one on stdout.
        if json && self.code != 6 {
            self.report_json_only()
        } else {
            ExitCode::from(self.code)
        }
    }

    /// Prints only the JSON error object (to stdout; the caller printed the text) and
    /// returns the exit code.
    pub(crate) fn report_json_only(self) -> ExitCode {
        println!("{}", self.json());
        ExitCode::from(self.code)
    }
}
