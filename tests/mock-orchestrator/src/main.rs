//! `kici-mock-orchestrator`: runs the strict mock orchestrator plus its HTTP control API for tests
//! written in C or Python, and prints one JSON line `{"ws":..., "control":...}` on stdout.
//!
//! It runs until `POST /shutdown`, SIGTERM or SIGINT, then exits with code 0.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use kici_mock_orchestrator::{
    control, AuthMode, MockConfig, MockOrchestrator, MockTls, TEST_TOKEN,
};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "usage: kici-mock-orchestrator [--token TOKEN | --no-auth] [--port P] \
[--ack-timeout-ms N] [--auth-timeout-ms N] [--register-timeout-ms N] [--heartbeat-timeout-ms N] \
[--ack-lookup-delay-ms N] [--close-after-register-ack CODE] [--trace] [--tls CA_FILE]
  default token: the library's TEST_TOKEN
  --tls: serve wss:// with a certificate from a fresh test CA, whose certificate (PEM) is written to CA_FILE";

/// A command line the binary cannot run with.
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("`{0}` needs a value")]
    MissingValue(String),
    #[error("`{flag}` needs a number, got `{value}`")]
    NotANumber { flag: String, value: String },
    #[error("unknown argument `{0}`")]
    Unknown(String),
}

/// What the command line asks for.
struct Options {
    config: MockConfig,
    /// Where to write the test CA's certificate (TLS mode).
    tls_ca_file: Option<PathBuf>,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, UsageError> {
    let mut tls_ca_file = None;
    let mut config = MockConfig {
        auth: AuthMode::Token(TEST_TOKEN.to_string()),
        ..MockConfig::default()
    };
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| UsageError::MissingValue(flag.clone()))
        };
        match flag.as_str() {
            "--token" => config.auth = AuthMode::Token(value()?),
            "--no-auth" => config.auth = AuthMode::None,
            "--trace" => config.trace = true,
            "--port" => config.port = number(&flag, value()?)?,
            "--ack-timeout-ms" => config.dispatch_ack_timeout = millis(&flag, value()?)?,
            "--auth-timeout-ms" => config.auth_timeout = millis(&flag, value()?)?,
            "--register-timeout-ms" => config.register_timeout = millis(&flag, value()?)?,
            "--heartbeat-timeout-ms" => config.heartbeat_timeout = millis(&flag, value()?)?,
            "--ack-lookup-delay-ms" => config.ack_lookup_delay = Some(millis(&flag, value()?)?),
            "--close-after-register-ack" => {
                config.close_after_register_ack = Some(number(&flag, value()?)?);
            }
            "--tls" => tls_ca_file = Some(PathBuf::from(value()?)),
            _ => return Err(UsageError::Unknown(flag)),
        }
    }
    Ok(Options {
        config,
        tls_ca_file,
    })
}

fn number<T: std::str::FromStr>(flag: &str, value: String) -> Result<T, UsageError> {
    value.parse().map_err(|_| UsageError::NotANumber {
        flag: flag.to_string(),
        value,
    })
}

fn millis(flag: &str, value: String) -> Result<Duration, UsageError> {
    number(flag, value).map(Duration::from_millis)
}

async fn run(options: Options) -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut config = options.config;
    if let Some(ca_file) = &options.tls_ca_file {
        let tls = MockTls::generate().map_err(std::io::Error::other)?;
        std::fs::write(ca_file, tls.ca_pem()).map_err(|err| {
            std::io::Error::new(
                err.kind(),
                format!("cannot write {}: {err}", ca_file.display()),
            )
        })?;
        config.tls = Some(tls);
    }
    let mock = MockOrchestrator::start(config).await?;
    let control = control::start(mock.clone()).await?;
    let endpoints = serde_json::json!({"ws": mock.ws_url(), "control": control.url()});
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{endpoints}")?;
    stdout.flush()?;
    drop(stdout);
    tokio::select! {
        () = control.shutdown_requested() => {}
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    mock.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("kici-mock-orchestrator: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("kici-mock-orchestrator: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<MockConfig, UsageError> {
        parse_args(args.iter().map(|arg| arg.to_string())).map(|options| options.config)
    }

    #[test]
    fn the_opt_in_orchestrator_behaviours_have_flags() {
        let config = parse(&[
            "--ack-lookup-delay-ms",
            "1500",
            "--close-after-register-ack",
            "1012",
        ])
        .unwrap();
        assert_eq!(config.ack_lookup_delay, Some(Duration::from_millis(1500)));
        assert_eq!(config.close_after_register_ack, Some(1012));
        let defaults = parse(&[]).unwrap();
        assert_eq!(
            (defaults.ack_lookup_delay, defaults.close_after_register_ack),
            (None, None)
        );
        assert!(matches!(
            parse(&["--close-after-register-ack", "x"]),
            Err(UsageError::NotANumber { .. })
        ));
    }
}
