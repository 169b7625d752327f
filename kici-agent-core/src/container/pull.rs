//! Getting a job's image onto the engine: look it up, pull it as the policy says.

use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;
use tracing::{debug, info};

use super::{ContainerError, ContainerExecutor, PullPolicy};

/// Splits an image reference into the `fromImage` and `tag` of a pull. A reference without a
/// tag means `latest` (an empty tag would pull every tag); a digest reference is passed whole.
fn pull_reference(image: &str) -> (String, Option<String>) {
    if image.contains('@') {
        return (image.to_owned(), None);
    }
    let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
    match image[name_start..].rfind(':') {
        Some(colon) => {
            let split = name_start + colon;
            (
                image[..split].to_owned(),
                Some(image[split + 1..].to_owned()),
            )
        }
        None => (image.to_owned(), Some("latest".to_owned())),
    }
}

impl ContainerExecutor {
    pub(super) async fn ensure_image(&self, image: &str) -> Result<(), ContainerError> {
        let present = match self.docker().await?.inspect_image(image).await {
            Ok(_) => true,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => false,
            Err(source) => {
                return Err(ContainerError::Engine {
                    action: format!("looking up image {image}"),
                    source,
                })
            }
        };
        match (self.settings.pull_policy, present) {
            (PullPolicy::Never, false) => Err(ContainerError::ImageMissing {
                image: image.to_owned(),
            }),
            (PullPolicy::Never | PullPolicy::IfNotPresent, true) => Ok(()),
            (PullPolicy::IfNotPresent | PullPolicy::Always, _) => self.pull(image).await,
        }
    }

    async fn pull(&self, image: &str) -> Result<(), ContainerError> {
        let (from_image, tag) = pull_reference(image);
        let options = CreateImageOptions {
            from_image: Some(from_image),
            tag,
            ..Default::default()
        };
        info!(image, "pulling image");
        let mut progress = self.docker().await?.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => debug!(image, status = ?info.status, progress = ?info.progress, "pull"),
                Err(e) => {
                    let message = match e {
                        bollard::errors::Error::DockerStreamError { error } => error,
                        bollard::errors::Error::DockerResponseServerError { message, .. } => {
                            message
                        }
                        other => other.to_string(),
                    };
                    return Err(ContainerError::PullFailed {
                        image: image.to_owned(),
                        message,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_references_always_name_a_tag() {
        let split = |image| pull_reference(image);
        assert_eq!(split("busybox"), ("busybox".into(), Some("latest".into())));
        assert_eq!(
            split("node:20-alpine"),
            ("node".into(), Some("20-alpine".into()))
        );
        assert_eq!(
            split("localhost:5000/team/app"),
            ("localhost:5000/team/app".into(), Some("latest".into()))
        );
        assert_eq!(
            split("localhost:5000/team/app:v1"),
            ("localhost:5000/team/app".into(), Some("v1".into()))
        );
        assert_eq!(
            split("alpine@sha256:abc"),
            ("alpine@sha256:abc".into(), None)
        );
    }
}
