//! The marker of tests that need the real test servers, for the unit tests
//! (`crate::test_support`) and the tests under `tests/` (`tests/common`,
//! which includes this file by path): one definition for both.

/// `#[apply(server_test!)]` on a test that needs the real test servers: a
/// `#[tokio::test]` (or a `#[test]` for a plain `fn`), ignored with the
/// reason unless built with `--features real-servers`.
macro_rules! server_test {
    ($(#[$m:meta])* $v:vis async fn $($rest:tt)*) => {
        $(#[$m])*
        #[cfg_attr(
            not(feature = "real-servers"),
            ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
        )]
        #[tokio::test]
        $v async fn $($rest)*
    };
    ($(#[$m:meta])* $v:vis fn $($rest:tt)*) => {
        $(#[$m])*
        #[cfg_attr(
            not(feature = "real-servers"),
            ignore = "needs the test servers: scripts/services.sh start, then --features real-servers"
        )]
        #[test]
        $v fn $($rest)*
    };
}
pub(crate) use server_test;
