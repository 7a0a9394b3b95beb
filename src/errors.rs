//! Error text for logs and reports: an error and its sources, `: `-separated (hyper's own says
//! only "client error (Connect)"; the cause, connection refused or an unknown CA, is further
//! down). Compiled in every build, for every module.

/// `e` and each of its sources, `: `-separated; a source whose text is already in what came
/// before it is left out (tokio-postgres and others repeat their source in their own text).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Whether `e`, or an error it wraps (its `source()` chain), satisfies `pred`: how an error
/// is recognised after hyper and our wrappers have boxed it.
pub fn any_cause(
    e: &(dyn std::error::Error + 'static),
    pred: impl FnMut(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    std::iter::successors(Some(e), |err| err.source()).any(pred)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sources_follow_the_error() {
        let e = ErrorWith(std::io::Error::other("connection refused"));
        assert_eq!(super::chain(&e), "outer: connection refused");
    }

    #[derive(Debug)]
    struct ErrorWith(std::io::Error);

    impl std::fmt::Display for ErrorWith {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("outer")
        }
    }

    impl std::error::Error for ErrorWith {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
