//! Route matching: method + path pattern → the index of the first matching route.
//!
//! Patterns are matched against the path the caller hands over, which must already be
//! percent-decoded and have its dot segments (`.`/`..`) resolved and its query removed: this module
//! does not normalise, so `/api/../admin` would not match `/admin/*` here. Matching is
//! case-sensitive and does not allocate.

use http::Method;

use super::config::RouteConfig;

/// One path segment of a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    /// Must equal this text.
    Lit(String),
    /// Any one non-empty segment (`*` or `{name}`).
    Any,
}

/// A parsed route path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    segs: Vec<Seg>,
    /// Ends in `/*`: the segments are a prefix.
    prefix: bool,
}

impl PathPattern {
    /// Parse `/exact`, `/prefix/*`, `/a/{id}/b` or `/a/*/b`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(format!("{pattern:?} must start with '/'"));
        };
        if pattern.contains(['?', '#']) {
            return Err(format!(
                "{pattern:?}: patterns match the path only, without query or fragment"
            ));
        }
        if pattern == "/*" {
            return Ok(Self {
                segs: Vec::new(),
                prefix: true,
            });
        }
        let (rest, prefix) = match rest.strip_suffix("/*") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        let mut segs = Vec::new();
        if !rest.is_empty() || !prefix {
            for s in rest.split('/') {
                let seg = if s == "*" || (s.starts_with('{') && s.ends_with('}') && s.len() > 2) {
                    Seg::Any
                } else if s.contains(['*', '{', '}']) {
                    return Err(format!(
                        "{pattern:?}: a wildcard must be a whole segment (`*` or `{{name}}`)"
                    ));
                } else if s == "." || s == ".." {
                    return Err(format!(
                        "{pattern:?}: dot segments never occur in a normalised path"
                    ));
                } else {
                    Seg::Lit(s.to_owned())
                };
                segs.push(seg);
            }
        }
        Ok(Self { segs, prefix })
    }

    /// Whether `path` (normalised, without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        if self.prefix && self.segs.is_empty() {
            return true;
        }
        let mut parts = rest.split('/');
        for seg in &self.segs {
            let Some(part) = parts.next() else {
                return false;
            };
            match seg {
                Seg::Lit(l) => {
                    if l != part {
                        return false;
                    }
                }
                Seg::Any => {
                    if part.is_empty() {
                        return false;
                    }
                }
            }
        }
        // A prefix covers itself, itself with a trailing slash, and everything below.
        self.prefix || parts.next().is_none()
    }
}

/// A compiled route: what [`Routes::find`] needs of a [`RouteConfig`].
#[derive(Debug)]
struct Compiled {
    methods: Vec<Method>,
    path: PathPattern,
}

/// The configured routes, compiled once.
#[derive(Debug)]
pub struct Routes {
    routes: Vec<Compiled>,
}

impl Routes {
    /// Compile; the config has been validated, but a bad pattern is still reported.
    pub fn new(cfgs: &[RouteConfig]) -> Result<Self, String> {
        let mut routes = Vec::with_capacity(cfgs.len());
        for (i, r) in cfgs.iter().enumerate() {
            let methods = r
                .methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("routes[{i}].methods: {e}"))?;
            let path = PathPattern::parse(&r.path).map_err(|e| format!("routes[{i}].path: {e}"))?;
            routes.push(Compiled { methods, path });
        }
        Ok(Self { routes })
    }

    /// The index of the first route matching `method` and `path`.
    pub fn find(&self, method: &Method, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| {
            (r.methods.is_empty() || r.methods.contains(method)) && r.path.matches(path)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        PathPattern::parse(pattern).unwrap().matches(path)
    }

    #[test]
    fn exact_patterns_match_only_themselves() {
        assert!(m("/health", "/health"));
        assert!(!m("/health", "/health/"));
        assert!(!m("/health", "/healthz"));
        assert!(!m("/health", "/health/x"));
        assert!(!m("/health", "/Health"));
        assert!(m("/", "/"));
        assert!(!m("/", "/a"));
    }

    #[test]
    fn prefix_patterns_cover_themselves_and_below() {
        assert!(m("/api/admin/*", "/api/admin"));
        assert!(m("/api/admin/*", "/api/admin/"));
        assert!(m("/api/admin/*", "/api/admin/users/7"));
        assert!(!m("/api/admin/*", "/api/administrator"));
        assert!(!m("/api/admin/*", "/api"));
        assert!(m("/*", "/anything/at/all"));
        assert!(m("/*", "/"));
    }

    #[test]
    fn wildcards_take_exactly_one_segment() {
        assert!(m("/users/{id}/keys", "/users/42/keys"));
        assert!(!m("/users/{id}/keys", "/users//keys"));
        assert!(!m("/users/{id}/keys", "/users/42/43/keys"));
        assert!(!m("/users/{id}/keys", "/users/42"));
        assert!(m("/v1/*/items", "/v1/shop/items"));
        assert!(m("/v1/*/items/*", "/v1/shop/items/9/x"));
        assert!(!m("/v1/*/items", "/v1/shop/items/9"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in ["api", "/a*", "/a/{id", "/a/?x=1", "/a/../b", "/a/{}/b"] {
            assert!(PathPattern::parse(p).is_err(), "{p}");
        }
    }

    #[test]
    fn first_match_wins_and_methods_filter() {
        let route = |methods: &[&str], path: &str| RouteConfig {
            methods: methods.iter().map(|s| s.to_string()).collect(),
            path: path.into(),
            public: false,
            roles: vec![],
            scopes: vec![],
            deny: false,
            rate: None,
            detect_threshold: None,
            detect: None,
        };
        let routes = Routes::new(&[
            route(&["GET"], "/api/admin/health"),
            route(&[], "/api/admin/*"),
            route(&["GET", "POST"], "/api/*"),
        ])
        .unwrap();
        assert_eq!(routes.find(&Method::GET, "/api/admin/health"), Some(0));
        assert_eq!(routes.find(&Method::POST, "/api/admin/health"), Some(1));
        assert_eq!(routes.find(&Method::DELETE, "/api/admin/x"), Some(1));
        assert_eq!(routes.find(&Method::GET, "/api/things"), Some(2));
        assert_eq!(routes.find(&Method::DELETE, "/api/things"), None);
        assert_eq!(routes.find(&Method::GET, "/other"), None);
    }
}
