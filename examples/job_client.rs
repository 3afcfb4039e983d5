//! The AMP job server's quickstart in Rust: three `sleep` calls of one
//! second each, sent at once, come back after about one second, because
//! three persistent workers run them side by side.
//!
//! Run with
//!
//! ```text
//! cargo build --release --examples
//! target/release/cluster --workers 4 --job-server 127.0.0.1:1337 target/release/examples/jobs
//! target/release/examples/job_client            # or: job_client http://HOST:PORT [TOKEN]
//! ```
//!
//! It prints each result and the time the three took, then shows how the
//! errors are told apart.

use std::time::{Duration, Instant};

use cluster::JobClient;
use serde_json::{json, Value};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:1337".into());
    let client = match args.next() {
        Some(token) => JobClient::connect_with_token(&url, &token).await?,
        None => JobClient::connect(&url).await?,
    };

    let started = Instant::now();
    // Three calls in flight at once, over the client's keep-alive pool.
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(
                async move { client.call::<_, Value>("sleep", &json!({"ms": 1000})).await },
            )
        })
        .collect();
    for call in calls {
        println!("{}", call.await??);
    }
    println!(
        "3 calls of 1 s took {:.2} s",
        started.elapsed().as_secs_f64()
    );

    match client
        .call::<_, Value>("no-such-handler", &json!(null))
        .await
    {
        Err(e) if e.is_not_found() => println!("not found: {}", e.message()),
        other => println!("unexpected: {other:?}"),
    }
    match client
        .call::<_, Value>("fail", &json!({"message": "no"}))
        .await
    {
        Err(e) if e.is_handler_error() => println!("handler error: {}", e.message()),
        other => println!("unexpected: {other:?}"),
    }
    let wait = Duration::from_millis(100);
    match client
        .call_with_timeout::<_, Value>("sleep", &json!({"ms": 10}), wait)
        .await
    {
        Ok(v) => println!("{v}"),
        Err(e) if e.is_timeout() => println!("every worker stayed busy: {e}"),
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
