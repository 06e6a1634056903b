"""What Aviator writes back to the cluster: policy status, Events, pod annotations, the
hot-avoiding Service, and the Lease that elects the one replica that writes.

Every replica watches, probes and serves xDS; only the leader writes. Decisions are pure and
take time as an argument; the I/O modules are thin:

=====================  =====================================================================
pure                   decides
=====================  =====================================================================
``status``             conditions (Accepted, ResolvedRefs, Programmed), their merge into the
                       server's status after GEP-713, Events for transitions
``acks``               what the proxies hold of each cluster's endpoints (ClusterAcks), the
                       CLA versions that carry the current endpoints, replica reports
``election``           client-go's leader election decisions, the three timing knobs
``annotations``        each pod's weight / latency / pod-deletion-cost annotations
``service``            which pods the ``<target>-aviator`` Service lists, its objects
``ratelimit``          per-object interval + global token bucket
=====================  =====================================================================

=====================  =====================================================================
I/O                    does
=====================  =====================================================================
``kube``               JSON requests over ``kubernetes.aio``'s ApiClient, own errors
``elector``            the Lease, ``is_leader``, leadership listeners, ``Fenced`` writes
``reconciler``         desired state → writes: on material change, rate-limited, leader-only
``status_writer``      policy status subresource + Events
``annotator``          pod annotations (``deploy/overlays/annotations`` RBAC)
``service_writer``     Services and Endpoints (``deploy/overlays/service`` RBAC)
``reports``            each replica's ACK counts in its own Lease; the leader reads them all
``runtime``            ``Operator``: all of the above behind three calls
``xds_acks``           this replica's ACK counts read off its ADS streams (no client, no I/O)
=====================  =====================================================================

Nothing is imported here: the I/O modules load the Kubernetes client, which a control plane
running from a directory source does not need.
"""
