//! Knative's KPA autoscaler, pure: no clock, no I/O. (Being written.)
