"""Fleet security of the hub (issue 11): who may talk on the broker, and what devices believe.

* ``ca``: the fleet CA (created by the hub, or the operator's), the broker's server certificate,
  the hub's own MQTT client certificate, device certificates, and the CRL the broker reads;
* ``fleetkey``: the fleet key (Ed25519, apart from the model-signing key) that signs desired state;
* ``mosquitto``: the broker's TLS listener, its ACL (a device publishes only on its own topics and
  reads only its own and its group's desired state) and password file;
* ``identity``: the identity bundle ``kestrel-hub devices add`` writes (docs/security.md);
* ``enrol``: enrolment, revocation and group changes, which regenerate the broker's files and
  reload it;
* ``refresh``: re-signing retained desired state before it expires, and the CRL before it does.

Every private key and password is written 0600 and never logged. See docs/security.md.
"""
