//! The signature policy (`signatures`, [`crate::signature`]) as the
//! admission webhooks' [`ExtraCheck`]: images a policy covers are allowed
//! only with a verified signature, and the mutating webhook pins them to
//! the digest that was verified.

use std::sync::Arc;

use super::{ExtraCheck, NormalisedImage, TrowLocation};
use crate::oci::Digest;
use crate::signature::SignatureVerifier;

/// [`SignatureVerifier`] behind the [`ExtraCheck`] trait.
pub struct SignatureCheck(pub Arc<SignatureVerifier>);

#[async_trait::async_trait]
impl ExtraCheck for SignatureCheck {
    fn applies(&self, image: &NormalisedImage) -> bool {
        self.0.applies(&image.image.name())
    }

    async fn check(
        &self,
        image: &NormalisedImage,
        location: &TrowLocation,
    ) -> Result<Option<Digest>, String> {
        self.0
            .verify(
                &image.image.name(),
                location.repo.as_str(),
                &location.reference,
            )
            .await
            .map(Some)
    }
}
