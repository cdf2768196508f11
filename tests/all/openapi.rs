// The served OpenAPI document is the one checked into docs/, so an API change
// shows in review. Bless a deliberate change with `UPDATE_EXPECT=1`.
#[tokio::test]
async fn openapi_matches_checked_in_copy() {
    let doc = kiln_coordinator::api::openapi().to_pretty_json().unwrap();
    expect_test::expect_file!["../../docs/openapi.json"].assert_eq(&(doc.clone() + "\n"));

    let bed = kiln_tests::bed::Bed::start().await;
    let served: serde_json::Value = bed.client.get("/v1/openapi.json").await.unwrap();
    assert_eq!(served, serde_json::from_str::<serde_json::Value>(&doc).unwrap());
}
