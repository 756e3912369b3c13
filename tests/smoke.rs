mod common;
use common::*;

#[tokio::test]
async fn base_endpoint_answers() {
    let t = Trow::start();
    let r = client().get(t.at("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(r.text().await.unwrap(), "{}");
    let (_m, d) = oci::push_image(&client(), &t.url, "a/b", "v1", 1).await;
    assert!(d.starts_with("sha256:"));
}
