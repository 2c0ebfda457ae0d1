#!/usr/bin/perl
# Verify the DKIM signatures of the message on standard input with Mail::DKIM (the
# verifier SpamAssassin uses), asking the DNS server given as the first argument
# ("127.0.0.1:PORT") for the keys.  Prints one line per signature: result, algorithm,
# domain, selector; then the overall result.
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Net::DNS::Resolver;

my ($host, $port) = split /:/, $ARGV[0];
my $resolver = Net::DNS::Resolver->new(nameservers => [$host], port => $port, recurse => 1,
                                       udp_timeout => 5, retry => 2);
Mail::DKIM::DNS::resolver($resolver);
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\015?\012$//;
    $dkim->PRINT("$line\015\012");
}
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    printf "%s %s %s %s (%s)\n", $sig->result, $sig->algorithm, $sig->domain, $sig->selector, $sig->result_detail;
}
printf "overall %s\n", $dkim->result;
