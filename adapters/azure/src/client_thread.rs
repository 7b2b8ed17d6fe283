//! Each client on an OS thread of its own, with a current-thread runtime.

use cloudbus_core::{Error, Result};
use tokio::sync::oneshot;

use crate::TRANSPORT;
use crate::error::closed;

/// Runs a client on a thread of its own with a current-thread tokio runtime: `open`
/// connects and returns the task to run; its error is returned here.
///
/// fe2o3-amqp 0.14 (under azservicebus) registers a sent delivery as awaiting settlement
/// only after the frame has left; on a multi-threaded runtime the broker's reply can arrive
/// first and be lost, and a send then hangs until azservicebus retries it and panics
/// ("called after complete"). With all of a client's tasks on one thread that cannot happen.
pub(crate) async fn on_client_thread<F, Open, Task>(open: F) -> Result<()>
where
    F: FnOnce() -> Open + Send + 'static,
    Open: std::future::Future<Output = Result<Task>> + Send + 'static,
    Task: std::future::Future<Output = ()> + Send + 'static,
{
    let (ready, opened) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("cloudbus-servicebus".into())
        .stack_size(8 * 1024 * 1024)
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready.send(Err(Error::transport(
                        TRANSPORT,
                        format!("cannot start the client's runtime: {e}"),
                        true,
                        None,
                    )));
                    return;
                }
            };
            // Spawned rather than run by block_on, so that the (large) client futures live
            // on the heap, not on this thread's stack.
            let client = runtime.spawn(async move {
                match open().await {
                    Ok(task) => {
                        let _ = ready.send(Ok(()));
                        task.await;
                    }
                    Err(error) => {
                        let _ = ready.send(Err(error));
                    }
                }
            });
            let _ = runtime.block_on(client);
        });
    if let Err(e) = spawned {
        return Err(Error::transport(
            TRANSPORT,
            format!("cannot start the client's thread: {e}"),
            true,
            None,
        ));
    }
    opened.await.unwrap_or_else(|_| Err(closed("client")))
}
