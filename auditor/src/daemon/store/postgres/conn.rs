//! The store's one connection: opened (and migrated) on demand, dropped when the server or the
//! network loses it, re-opened by the next call after an exponential backoff; and the
//! transaction every operation runs in.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::postgres::error::SqlState;
use ::postgres::{Client, Config, NoTls, Transaction};

use super::schema;
use crate::daemon::job::StoreError;

/// The first wait after a failed connection attempt; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Connection timeout when the URL sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const SESSION_SETTINGS: &str = "SET idle_in_transaction_session_timeout = '60s'; SET lock_timeout = '10s'";

/// [`crate::daemon::job::Store`] on PostgreSQL.
pub struct PgStore {
    config: Config,
    /// `postgres://user@host:port/db`, what messages say (the password is never part of it).
    name: String,
    conn: Mutex<Conn>,
}

/// The connection, or why there is none and when to try again.
#[derive(Default)]
struct Conn {
    client: Option<Client>,
    /// Failed connection attempts in a row.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Why an operation failed: the database, or a stored row that does not parse.
pub(super) enum Fail {
    Pg(::postgres::Error),
    Bad(String),
}

impl From<::postgres::Error> for Fail {
    fn from(e: ::postgres::Error) -> Fail {
        Fail::Pg(e)
    }
}

pub(super) type Tx<'a, 'b> = &'a mut Transaction<'b>;

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`, or the
    /// key=value form), and applies the schema migrations it lacks.
    pub fn connect(url: &str) -> Result<PgStore, StoreError> {
        // The parser's messages name the option at fault, never its value: the URL is not echoed.
        let mut config: Config =
            url.parse().map_err(|e| StoreError(format!("postgres store: the URL does not parse: {}", describe(&e))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("tiebreak-auditor");
        let store = PgStore { name: display_name(&config), config, conn: Mutex::new(Conn::default()) };
        let client = store.open().map_err(|e| StoreError(format!("{}: {e}", store.name)))?;
        store.conn.lock().unwrap_or_else(|p| p.into_inner()).client = Some(client);
        Ok(store)
    }

    /// The store as messages name it (no password).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A new connection, migrated.
    fn open(&self) -> Result<Client, String> {
        let mut client = self.config.connect(NoTls).map_err(|e| format!("connecting: {}", describe(&e)))?;
        schema::migrate(&mut client, now_ms())?;
        // Every transaction of ours is short. A daemon cut off mid-transaction must not hold its
        // locks (the queue lock above all) until the server notices the dead socket, and a daemon
        // waiting on a lock must get an error it retries rather than hang. (Set after migrating:
        // waiting for another daemon's migration is fine.)
        client.batch_execute(SESSION_SETTINGS).map_err(|e| format!("configuring the session: {}", describe(&e)))?;
        Ok(client)
    }

    /// The connection, re-opened if it was lost, unless the last attempt failed less than its
    /// backoff ago.
    fn client<'c>(&self, conn: &'c mut Conn) -> Result<&'c mut Client, StoreError> {
        if conn.client.as_ref().is_some_and(Client::is_closed) {
            conn.client = None;
        }
        if conn.client.is_none() {
            let now = Instant::now();
            if let Some(at) = conn.retry_at
                && at > now
            {
                return Err(StoreError(format!(
                    "{}: database unreachable, retrying in {} ms (last error: {})",
                    self.name,
                    (at - now).as_millis(),
                    conn.last_error
                )));
            }
            match self.open() {
                Ok(client) => {
                    if conn.failures > 0 {
                        tracing::info!(store = %self.name, "reconnected to the database");
                    }
                    *conn = Conn { client: Some(client), ..Conn::default() };
                }
                Err(e) => {
                    conn.failures = conn.failures.saturating_add(1);
                    let wait = BACKOFF_FIRST.saturating_mul(1 << (conn.failures - 1).min(16)).min(BACKOFF_MAX);
                    conn.retry_at = Some(now + wait);
                    conn.last_error = e;
                    return Err(StoreError(format!(
                        "{}: database unreachable ({}), retrying in {} ms",
                        self.name,
                        conn.last_error,
                        wait.as_millis()
                    )));
                }
            }
        }
        Ok(conn.client.as_mut().expect("connected above"))
    }

    /// Runs `f` in one transaction. A connection found dead when the transaction begins (nothing
    /// of ours ran yet) is replaced at once, once; one that fails later is dropped, and the next
    /// call reconnects (the caller retries: the transaction may or may not have committed).
    pub(super) fn with<T>(&self, mut f: impl FnMut(Tx<'_, '_>) -> Result<T, Fail>) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut retried = false;
        loop {
            let reused = conn.client.is_some();
            let client = self.client(&mut conn)?;
            let outcome = match client.transaction() {
                Ok(mut tx) => Some(f(&mut tx).and_then(|v| Ok(tx.commit().map(|()| v)?))),
                Err(e) if reused && !retried && is_gone(&e) => {
                    let error = describe(&e);
                    tracing::warn!(store = %self.name, error, "the database connection was lost; reconnecting");
                    None
                }
                Err(e) => Some(Err(Fail::Pg(e))),
            };
            let Some(r) = outcome else {
                conn.client = None;
                retried = true;
                continue;
            };
            return r.map_err(|e| match e {
                Fail::Bad(why) => StoreError(format!("{}: {why}", self.name)),
                Fail::Pg(e) => {
                    if is_gone(&e) || conn.client.as_ref().is_some_and(Client::is_closed) {
                        let error = describe(&e);
                        tracing::warn!(store = %self.name, error, "the database connection was lost");
                        conn.client = None;
                    }
                    StoreError(format!("{}: {}", self.name, describe(&e)))
                }
            });
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The sync client owns a runtime, which may not be dropped in an async context: if the
        // last handle goes away there, the connection is closed on a thread of its own.
        let client = self.conn.get_mut().unwrap_or_else(|p| p.into_inner()).client.take();
        if let Some(client) = client
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let _ = std::thread::spawn(move || drop(client)).join();
        }
    }
}

/// `postgres://user@host:port/db`, from the parsed configuration (which keeps the password
/// apart).
fn display_name(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(::postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(::postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("postgres store postgres://{user}{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

/// `e` with its causes: the client's own message says only "db error" and leaves the
/// server's message to its source.
pub(super) fn describe(e: &::postgres::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Whether `e` means the connection is gone (the next call must reconnect).
fn is_gone(e: &::postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_some_and(|c| {
            c.code().starts_with("08")
                || [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW].contains(c)
        })
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
