//! The listener: one connection of its own that `LISTEN`s on the schema's
//! channel and wakes the dispatcher for every notification. When the
//! connection ends (the server restarted, the network broke) it connects
//! again with a growing pause, and wakes the dispatcher once it listens
//! again, since notifications sent meanwhile were lost.

use std::time::Duration;

use tokio_postgres::{AsyncMessage, NoTls};

use super::conn::describe_pg;

/// Listens until the future is dropped.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    channel: &str,
    label: &str,
    wake: Box<dyn Fn() + Send + Sync>,
) {
    let mut pause = Duration::from_millis(100);
    let mut down_since: Option<std::time::Instant> = None;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages = std::pin::pin!(async {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(_))) => wake(),
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return describe_pg(&e),
                            None => return "the connection closed".to_string(),
                        }
                    }
                });
                let sql = format!("LISTEN \"{channel}\"");
                let listened = tokio::select! {
                    why = &mut messages => Err(why),
                    r = client.batch_execute(&sql) => r.map_err(|e| describe_pg(&e)),
                };
                let why = match listened {
                    Ok(()) => {
                        if down_since.take().is_some() {
                            tracing::info!("job store {label}: listening for new jobs again");
                        }
                        pause = Duration::from_millis(100);
                        // What was queued while nobody listened.
                        wake();
                        messages.await
                    }
                    Err(why) => why,
                };
                drop(client);
                if down_since.is_none() {
                    down_since = Some(std::time::Instant::now());
                    tracing::warn!(
                        "job store {label}: the listener's connection ended ({why}); reconnecting (polling meanwhile)"
                    );
                }
            }
            Err(e) => {
                if down_since.is_none() {
                    down_since = Some(std::time::Instant::now());
                    tracing::warn!(
                        "job store {label}: cannot connect the listener ({}); retrying (polling meanwhile)",
                        describe_pg(&e)
                    );
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
