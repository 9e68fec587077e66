// Package monitoring pins prometheus-operator's API types, from which
// controller-gen generates the monitoring.coreos.com CRDs the tests install
// (scripts/kube-build.sh monitoring-crds).
package monitoring

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
