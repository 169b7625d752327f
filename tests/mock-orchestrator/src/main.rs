//! `kici-mock-orchestrator`: runs the strict mock orchestrator plus its HTTP control API for tests
//! written in C or Python, and prints one JSON line `{"ws":..., "control":...}` on stdout.
//!
//! It runs until `POST /shutdown`, SIGTERM or SIGINT, then exits with code 0.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use kici_mock_orchestrator::{control, AuthMode, MockConfig, MockOrchestrator, TEST_TOKEN};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "usage: kici-mock-orchestrator [--token TOKEN | --no-auth] [--port P] \
[--ack-timeout-ms N] [--auth-timeout-ms N] [--register-timeout-ms N] [--heartbeat-timeout-ms N] \
[--ack-lookup-delay-ms N] [--close-after-register-ack CODE] [--trace]
  default token: the library's TEST_TOKEN";

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

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<MockConfig, UsageError> {
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
            _ => return Err(UsageError::Unknown(flag)),
        }
    }
    Ok(config)
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

async fn run(config: MockConfig) -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
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
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("kici-mock-orchestrator: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(config).await {
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
        parse_args(args.iter().map(|arg| arg.to_string()))
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
