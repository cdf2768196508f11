//! Images: what builds made, with their provenance.

use kiln_protocol::api::Image;
use kiln_protocol::quote::quote;

use super::{App, AppError};
use crate::providers::ImageId;

impl App {
    pub fn images(&self) -> Result<Vec<Image>, AppError> {
        Ok(self.0.store.images()?)
    }

    pub fn image(&self, name: &str) -> Result<Image, AppError> {
        self.0
            .store
            .image(name)?
            .ok_or_else(|| AppError::not_found(format!("image {}", quote(name)), "list them with `kiln image list`"))
    }

    /// Deletes an image from its cloud, then forgets it.
    pub async fn remove_image(&self, name: &str) -> Result<(), AppError> {
        let image = self.image(name)?;
        let cloud = self.cloud(&image.cloud).map_err(|_| {
            AppError::Conflict(format!(
                "cloud {} of image {name} is no longer configured; add it again to delete the image through it",
                image.cloud
            ))
        })?;
        let provider =
            self.0.providers.get(cloud.kind).ok_or_else(|| {
                AppError::Unavailable(format!("no provider for clouds of kind {}", cloud.kind.as_str()))
            })?;
        provider.delete_image(&self.with_credentials(&cloud, None)?, &ImageId(image.id.clone())).await.map_err(
            |e| AppError::Conflict(format!("cloud {} could not delete image {}: {e}", cloud.name, image.id)),
        )?;
        self.0.store.remove_image(name)?;
        self.0.store.flush().await?;
        tracing::info!(image = %image.id, "image deleted");
        Ok(())
    }
}
