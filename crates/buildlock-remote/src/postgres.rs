//! The PostgreSQL engine: [`Settings`] and [`Session`] behind the [`Engine`] traits.

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::engine::{BoxFuture, Engine, EngineSession};
use crate::session::{Grant, Session};
use crate::{Error, Holder, LockEntry, Request, Settings};

impl Engine for Settings {
    fn engine(&self) -> &'static str {
        "PostgreSQL"
    }

    fn display(&self) -> String {
        Settings::display(self)
    }

    fn to_url(&self) -> String {
        Settings::to_url(self)
    }

    fn remote_timeout(&self) -> Duration {
        self.remote_timeout
    }

    fn with_remote_timeout(&self, t: Duration) -> Result<Arc<dyn Engine>, Error> {
        Ok(Arc::new(self.clone().with_remote_timeout(t)?))
    }

    fn heartbeat(&self) -> Duration {
        Settings::heartbeat(self)
    }

    fn connect(&self) -> BoxFuture<'_, Result<Box<dyn EngineSession>, Error>> {
        Box::pin(async move {
            let session = Session::connect(self).await?;
            Ok(Box::new(PgSession { session, held: None, spoiled: false }) as Box<dyn EngineSession>)
        })
    }
}

/// A session and the lock it holds (the name, for errors, and the grant, to release it).
struct PgSession {
    session: Session,
    held: Option<(String, Grant)>,
    /// A request failed (other than for a busy lock): never reused.
    spoiled: bool,
}

impl EngineSession for PgSession {
    fn acquire<'a>(
        &'a mut self,
        req: &'a Request,
        on_wait: &'a mut (dyn FnMut(&Holder) + Send),
    ) -> BoxFuture<'a, Result<u64, Error>> {
        Box::pin(async move {
            let mut on_wait = on_wait;
            // Until it returns: a wait given up (the future dropped) spoils the session too.
            self.spoiled = true;
            let grant = self.session.acquire(req, &mut on_wait).await;
            self.spoiled = !matches!(grant, Ok(_) | Err(Error::Busy { .. })) || !self.session.clean();
            let grant = grant?;
            self.held = Some((req.name.clone(), grant));
            Ok(grant.token)
        })
    }

    fn release(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            let Some((name, grant)) = self.held.take() else { return Ok(()) };
            self.spoiled = true;
            let released = self.session.release(&name, grant).await;
            self.spoiled = released.is_err();
            released
        })
    }

    fn heartbeat(&self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(self.session.heartbeat())
    }

    fn closed(&self) -> watch::Receiver<Option<String>> {
        self.session.closed()
    }

    fn abort(&self) {
        self.session.abort_handle().abort();
    }

    fn socket(&self) -> Option<&File> {
        Some(self.session.socket())
    }

    fn reusable(&self) -> bool {
        !self.spoiled && self.held.is_none() && self.session.closed().borrow().is_none()
    }

    fn status<'a>(&'a self, name: Option<&'a str>) -> BoxFuture<'a, Result<Vec<LockEntry>, Error>> {
        Box::pin(self.session.status(name))
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        let abort = self.session.abort_handle();
        Box::pin(async move {
            // `Session::close` waits a second at most for the server to see the end.
            self.session.close().await;
            abort.abort();
        })
    }
}
