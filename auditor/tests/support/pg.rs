//! A fresh PostgreSQL database per test, on the server `TIEBREAK_PG_URL` names (start a
//! throwaway one with `scripts/pg-throwaway.sh`). Without the variable the PostgreSQL tests
//! skip, saying so, unless `TIEBREAK_PG_REQUIRED=1` (CI), where they fail.

use std::sync::atomic::{AtomicU64, Ordering};

static SERIAL: AtomicU64 = AtomicU64::new(0);

/// A fresh database, dropped with the value.
pub struct PgDb {
    base: String,
    pub name: String,
    /// `TIEBREAK_PG_URL` with the database replaced by this one.
    pub url: String,
}

impl PgDb {
    /// A new database named after `tag`; `None` (after printing why) when there is no server to
    /// use and none is required.
    pub fn create(tag: &str) -> Option<PgDb> {
        let required = std::env::var("TIEBREAK_PG_REQUIRED").is_ok_and(|v| v == "1");
        let unavailable = |why: String| {
            assert!(!required, "TIEBREAK_PG_REQUIRED=1 but {why}: the PostgreSQL tests cannot run");
            eprintln!("skipped: {why} (set TIEBREAK_PG_URL, e.g. with scripts/pg-throwaway.sh, to run it)");
        };
        let Ok(base) = std::env::var("TIEBREAK_PG_URL") else {
            unavailable("TIEBREAK_PG_URL is not set".into());
            return None;
        };
        let mut admin = match postgres::Client::connect(&base, postgres::NoTls) {
            Ok(c) => c,
            Err(e) => {
                unavailable(format!("the database of TIEBREAK_PG_URL is unreachable ({e})"));
                return None;
            }
        };
        let name = format!("tb_{tag}_{}_{}", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed));
        // Two statements: CREATE DATABASE cannot run inside the transaction one batch makes.
        for sql in [format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), format!("CREATE DATABASE {name}")] {
            admin.batch_execute(&sql).unwrap_or_else(|e| {
                panic!("{sql}: {}", e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string()))
            });
        }
        let url = with_dbname(&base, &name);
        Some(PgDb { base, name, url })
    }

    /// A plain client on this database (not a store).
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls).unwrap()
    }

    /// A client on the server's base database (to alter or drop this one).
    pub fn admin(&self) -> postgres::Client {
        postgres::Client::connect(&self.base, postgres::NoTls).unwrap()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.base, postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// `url` naming database `db` instead (a later `dbname` parameter wins in both URL forms).
pub fn with_dbname(url: &str, db: &str) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}dbname={db}")
    } else {
        format!("{url} dbname={db}")
    }
}
