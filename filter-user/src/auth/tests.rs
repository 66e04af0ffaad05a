//! Tests of the whole check: credentials, routes and limits.

use super::*;

fn _check_is_send(auth: &Auth, req: &RequestInfo<'_>) -> impl Send {
    auth.check(req)
}
