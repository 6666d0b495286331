// containerd's own snapshotter test suite (snapshots/testsuite, from Debian's
// golang-github-containerd-containerd-dev), run against nydus-snapshotter through containerd's
// proxy snapshotter: every test starts a fresh `nydus-snapshotter --no-remote` on its root and
// talks to it over gRPC, exactly as containerd's proxy plugin does.
//
// Built offline in GOPATH mode by tests/e2e/test_containerd_testsuite.py;
// NYDUS_SNAPSHOTTER names the command (argv, split on spaces) that runs the snapshotter.
package suite

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	argv := strings.Fields(os.Getenv("NYDUS_SNAPSHOTTER"))
	if len(argv) == 0 {
		return nil, nil, fmt.Errorf("NYDUS_SNAPSHOTTER is not set")
	}
	state := filepath.Join(filepath.Dir(root), "snapshotter")
	if err := os.MkdirAll(state, 0700); err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(state, "grpc.sock")
	logf, err := os.Create(filepath.Join(state, "snapshotter.log"))
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(argv[0], append(argv[1:], "--root", root, "--address", sock, "--no-remote")...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		return logf.Close()
	}
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-exited:
			logf.Close()
			out, _ := os.ReadFile(logf.Name())
			return nil, nil, fmt.Errorf("snapshotter exited (%v): %s", err, out)
		case <-time.After(20 * time.Millisecond):
		}
	}
	conn, err := grpc.DialContext(ctx, "unix://"+sock, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "nydus-py")
	return sn, func() error {
		conn.Close()
		return stop()
	}, nil
}

func TestNydusSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root (overlay mounts)")
	}
	testsuite.SnapshotterSuite(t, "nydus-py", newSnapshotter)
}
