//! Unit tests of the command line: parsing and validation.

use super::*;

fn parse(args: &[&str]) -> Result<Args, clap::Error> {
    Args::try_parse_from(std::iter::once("cluster").chain(args.iter().copied()))
}

#[test]
fn program_arguments_that_look_like_options_go_to_the_program() {
    let a = parse(&["-w", "2", "./srv", "--port", "80"]).unwrap();
    assert_eq!(a.workers, Some(2));
    assert_eq!(a.command, ["./srv", "--port", "80"]);
    let a = parse(&["--", "./srv", "-w", "3"]).unwrap();
    assert_eq!(a.workers, None);
    assert_eq!(a.command, ["./srv", "-w", "3"]);
}

#[test]
fn bad_input_is_refused() {
    assert!(parse(&["--workers", "0", "./srv"]).is_err());
    assert!(parse(&["--workers", "x", "./srv"]).is_err());
    assert!(parse(&["--bogus", "./srv"]).is_err());
    assert!(parse(&["--shutdown-timeout", "-1", "./srv"]).is_err());
    assert!(parse(&["--backlog", "0", "./srv"]).is_err());
    assert!(parse(&[]).is_err());
    assert!(parse(&["--metrics", "nope", "./srv"]).is_err());
    assert!(parse(&["--log-file", "x.log", "./srv"]).is_err());
}

#[test]
fn operations_options() {
    let a = parse(&["--metrics", ":9100", "--daemon", "-p", "x.pid", "./srv"]).unwrap();
    assert_eq!(a.metrics, Some("0.0.0.0:9100".parse().unwrap()));
    assert!(a.daemon);
    let a = parse(&["--metrics", "127.0.0.1:9100", "./srv"]).unwrap();
    assert_eq!(a.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    let a = parse(&["--http", ":8081", "./srv"]).unwrap();
    assert_eq!(a.http, Some("127.0.0.1:8081".parse().unwrap()));
    assert!(parse(&["--http-token-file", "t", "./srv"]).is_err());
}

#[test]
fn health_options() {
    let a = parse(&[
        "--max-restarts",
        "3",
        "--restart-window",
        "60",
        "--max-memory",
        "512M",
        "--stderr-level",
        "error",
        "./srv",
    ])
    .unwrap();
    assert_eq!(a.max_restarts, 3);
    assert_eq!(a.restart_window, Duration::from_secs(60));
    assert_eq!(a.max_memory, Some(512 << 20));
    assert_eq!(a.stderr_level, tracing::Level::ERROR);
    assert!(parse(&["--max-memory", "lots", "./srv"]).is_err());
    assert!(parse(&["--stderr-level", "loud", "./srv"]).is_err());
    let d = parse(&["./srv"]).unwrap();
    assert_eq!(d.max_restarts, cluster::DEFAULT_MAX_RESTARTS);
    assert_eq!(d.stderr_level, tracing::Level::WARN);
}

#[test]
fn any_language_options() {
    let a = parse(&[
        "--listen", "web=:80", "--listen", ":81", "--notify", "./srv",
    ])
    .unwrap();
    assert_eq!(a.listen, ["web=:80", ":81"]);
    assert!(a.notify);
    assert!(parse(&["--notify", "--ready-delay", "2", "./srv"]).is_err());
    let a = parse(&["--ready-delay", "0.5", "--stop-signal", "QUIT", "./srv"]).unwrap();
    assert_eq!(a.ready_delay, Duration::from_millis(500));
    assert_eq!(a.stop_signal, "QUIT");
}

#[test]
fn shared_state_options() {
    let a = parse(&["--names", "a,b,c", "--revive", "never", "./srv"]).unwrap();
    assert_eq!(a.names, ["a", "b", "c"]);
    assert_eq!(a.revive, cluster::Revive::Never);
    assert_eq!(a.storage_max_bytes, 64 << 20);
    assert!(parse(&["--name", "w", "--names", "a", "./srv"]).is_err());
    assert!(parse(&["--revive", "sometimes", "./srv"]).is_err());
    assert_eq!(parse_bytes("1024").unwrap(), 1024);
    assert_eq!(parse_bytes("2K").unwrap(), 2048);
    assert_eq!(parse_bytes("1MiB").unwrap(), 1 << 20);
    assert!(parse_bytes("0").is_err());
    assert!(parse_bytes("12Q").is_err());
}

#[test]
fn defaults() {
    let a = parse(&["./srv"]).unwrap();
    assert_eq!(a.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(a.backlog, cluster::DEFAULT_BACKLOG);
    assert_eq!(a.pid_file, None);
}
